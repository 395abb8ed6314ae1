"""Mixup / CutMix (timm's) and the training loss that matches the targets it produces."""

from __future__ import annotations

from timm.data.mixup import Mixup, mixup_target
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

__all__ = ["BatchMixup", "build_mixup"]


class BatchMixup(Mixup):
    """timm's Mixup in "batch" mode (one lambda per batch, sample i mixed with sample n-1-i), also for odd
    batch sizes, which appear when the collate drops unreadable files: the middle sample is then mixed with
    itself, i.e. left as it is. timm asserts on odd sizes only because its "pair"/"elem" modes need pairs."""

    def __call__(self, x, target):
        if self.mode != "batch" or len(x) % 2 == 0:
            return super().__call__(x, target)
        lam = self._mix_batch(x)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing, self.multi_label)


def build_mixup(
    mixup: float,
    cutmix: float,
    smoothing: float,
    num_classes: int,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[BatchMixup | None, nn.Module]:
    """Return ``(mixup_fn or None, train_loss)``.

    Mixup is active when ``mixup`` or ``cutmix`` alpha > 0 and ``prob`` > 0; its targets are soft (smoothed by
    ``smoothing``), so the loss is SoftTargetCrossEntropy. Otherwise the loss is LabelSmoothingCrossEntropy
    when ``smoothing`` > 0, else plain CrossEntropyLoss. Evaluate with plain cross entropy in any case.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if min(mixup, cutmix, smoothing, prob) < 0 or smoothing >= 1:
        raise ValueError(
            f"need mixup, cutmix, prob >= 0 and 0 <= smoothing < 1; got mixup={mixup}, "
            f"cutmix={cutmix}, prob={prob}, smoothing={smoothing}"
        )
    if (mixup > 0 or cutmix > 0) and prob > 0:
        fn = BatchMixup(
            mixup_alpha=mixup,
            cutmix_alpha=cutmix,
            prob=prob,
            switch_prob=switch_prob,
            mode="batch",
            label_smoothing=smoothing,
            num_classes=num_classes,
        )
        return fn, SoftTargetCrossEntropy()
    if smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=smoothing)
    return None, nn.CrossEntropyLoss()
