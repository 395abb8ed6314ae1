"""Classification metrics accumulated over batches and summed over ranks: loss, top-1/top-5, per-class
accuracy and the confusion matrix (rows = true class, columns = predicted)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_gather_objects, all_reduce_sum
from .distributed import world_size as _world

__all__ = ["ClassificationMeter", "evaluate", "autocast"]


class ClassificationMeter:
    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.loss_sum = 0.0
        self.top5_correct = 0
        self.count = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits, target = logits.detach().float().cpu(), target.cpu()
        self.loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        pred = logits.argmax(1)
        self.confusion += torch.bincount(
            target * self.num_classes + pred, minlength=self.num_classes**2
        ).view(self.num_classes, -1)
        k = min(5, logits.shape[1])
        self.top5_correct += (logits.topk(k, 1).indices == target[:, None]).any(1).sum().item()
        self.count += len(target)

    def reduce(self) -> None:
        """Sum the accumulated counts over all ranks (no-op when not distributed)."""
        self.confusion = all_reduce_sum(self.confusion)
        t = all_reduce_sum(
            torch.tensor([self.loss_sum, float(self.top5_correct), float(self.count)], dtype=torch.float64)
        )
        self.loss_sum, self.top5_correct, self.count = t[0].item(), int(t[1].item()), int(t[2].item())

    def result(self) -> dict[str, Any]:
        n = max(1, self.count)
        per_class_total = self.confusion.sum(1)
        diag = self.confusion.diag()
        per_class = [
            (d / t * 100).item() if t else float("nan") for d, t in zip(diag.double(), per_class_total)
        ]
        return {
            "loss": self.loss_sum / n,
            "top1": diag.sum().item() / n * 100,
            "top5": self.top5_correct / n * 100,
            "count": self.count,
            "per_class_acc": per_class,
            "confusion": self.confusion.tolist(),
        }


def autocast(device: torch.device, enabled: bool, dtype: str = "bfloat16"):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    num_classes: int,
    amp: bool = False,
    amp_dtype: str = "bfloat16",
    channels_last: bool = False,
    progress=None,
    lockstep: bool = False,
    flip: bool = False,
) -> dict[str, Any]:
    """Loss, top-1/5, per-class accuracy and confusion over the loader (summed over ranks), plus
    ``skipped_files``/``skipped``: the unreadable images left out (:class:`BadSample`, all ranks).

    ``lockstep``: for a model whose forward is itself a collective (FSDP all-gathers its parameters per
    block), every rank runs as many forwards as the rank with the most batches: evaluation shards differ in
    length (an uneven split, a batch of unreadable images left out), and a rank that stopped early would leave
    the others waiting in an all-gather forever. A rank out of batches runs the model on a one-image dummy
    and scores nothing.

    ``flip``: test-time augmentation, each image scored as the mean of its logits and those of its mirror
    image (twice the forwards; for data whose classes are mirror-symmetric, as training with flips
    assumes)."""
    was_training = model.training
    model.eval()
    meter = ClassificationMeter(num_classes)
    it = iter(loader)
    shape: tuple[int, ...] | None = None  # of this rank's last real input, for its dummies
    while True:
        batch = next(it, None)
        if lockstep:
            have = int(all_reduce_sum(torch.tensor([int(batch is not None)])).item())
            if have == 0:
                break
            if have < _world():  # some rank is out: each says its input shape, for a rank that had none
                shapes = all_gather_objects(tuple(batch[0].shape) if batch is not None else shape)
                shape = shape or next(s for s in shapes if s is not None)
        elif batch is None:
            break
        if batch is None:
            x = torch.zeros((1, *shape[1:]), device=device)
        else:
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            shape = tuple(x.shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp, amp_dtype):
            logits = model(x)
            if flip:
                logits = (logits + model(x.flip(-1))) / 2
        if batch is None:
            continue  # the dummy's forward only kept the collectives in step
        meter.update(logits, y)
        if progress is not None:
            progress.update(1)
    meter.reduce()
    model.train(was_training)
    # unreadable images the loader left out, of every rank (a collective, like meter.reduce): the caller
    # reports them, as the trainer does for training images, instead of scoring fewer images silently
    skipped = [b for part in all_gather_objects(list(getattr(loader, "bad", []))) for b in part]
    return {**meter.result(), "skipped_files": len(skipped), "skipped": skipped}
