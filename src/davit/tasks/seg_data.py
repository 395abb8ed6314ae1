"""ADE20K-style semantic segmentation data (images + PNG label maps) and the mIoU / accuracy metric.

Layout: an image folder and a label folder whose files share stems (``images/training/x.jpg`` ->
``annotations/training/x.png``). Label value 255 is ignored; ``reduce_zero_label`` maps 0 ("other" in ADE20K)
to 255 and shifts the rest down by one, as mmseg does for ADE20K's 150 classes.

Training transform of the recipe (torchvision v2): random rescale keeping the aspect ratio so that the
image fits the (2048, 512) scale times a ratio drawn from [0.5, 2.0] (long side within 2048 x ratio, short
side within 512 x ratio, as mmseg's ``Resize``), a random crop (padding images with 0 and labels with
255), horizontal flip, photometric jitter, ImageNet normalisation. mmseg's
``cat_max_ratio`` crop retry is not reproduced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .segmentation import IGNORE_INDEX, rescale_size

__all__ = ["SegFolder", "SegMetric", "RescaleKeepRatio"]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class RescaleKeepRatio(v2.Transform):
    """mmseg's ``Resize(img_scale=scale, ratio_range=..., keep_ratio=True)`` as a torchvision v2 transform:
    a ratio drawn uniformly from ``ratio_range``, then the image (and its label map, nearest) rescaled by
    :func:`~davit.tasks.segmentation.rescale_size`. torchvision's ``ScaleJitter`` fits a fixed
    (width, height) box instead, which gives a landscape image its long side where the short one belongs
    (a 683 x 512 ADE20K image, width x height, came out 512 x 384 instead of 683 x 512)."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (1.0, 1.0)) -> None:
        super().__init__()
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def make_params(self, flat_inputs: list) -> dict:
        h, w = next(v2.functional.get_size(x) for x in flat_inputs if isinstance(x, tv_tensors.Image))
        lo, hi = self.ratio_range
        ratio = lo + torch.rand(1).item() * (hi - lo)  # one draw per sample, like ScaleJitter's
        return dict(size=rescale_size(h, w, self.scale, ratio))

    def transform(self, inpt, params: dict):
        return v2.functional.resize(inpt, params["size"], antialias=True)  # masks: nearest, by type


class SegFolder(Dataset):
    """(normalised float image (3, H, W), int64 labels (H, W)) pairs.

    Args:
        scale: (long, short) base scale for the random rescale (recipe (2048, 512)); None keeps the size.
        ratio_range: rescale ratios drawn uniformly (recipe (0.5, 2.0)); training only.
        crop_size: random crop side in training (recipe 512); evaluation returns the whole image.
        flip_prob, photometric: horizontal flip probability (recipe 0.5) and colour jitter (recipe on).
        cache: keep every decoded image and label map in memory after its first read (per process). For
            small datasets such as the CPU demo's scenes, where decoding was a fifth of each sample's cost;
            ADE20K's 20k images would need ~20 GB.
        num_classes: when given, a label map holding a value >= num_classes (other than the ignore index
            255) is refused with the file's name, instead of failing later inside the loss (on a GPU as a
            device-side assert).
    """

    def __init__(
        self,
        img_dir: str | os.PathLike,
        ann_dir: str | os.PathLike,
        train: bool = False,
        crop_size: int = 512,
        scale: Sequence[int] | None = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        reduce_zero_label: bool = False,
        flip_prob: float = 0.5,
        photometric: bool = True,
        cache: bool = False,
        num_classes: int | None = None,
    ) -> None:
        img_dir, ann_dir = Path(img_dir), Path(ann_dir)
        for p in (img_dir, ann_dir):
            if not p.is_dir():
                raise FileNotFoundError(f"segmentation folder {os.fspath(p)!r} not found")
        labels = {p.stem: p for p in ann_dir.iterdir() if p.suffix == ".png"}
        self.items = [
            (p, labels[p.stem])
            for p in sorted(img_dir.iterdir())
            if p.suffix.lower() in _IMG_EXT and p.stem in labels
        ]
        if not self.items:
            raise ValueError(
                f"no image/label pairs with matching names in {img_dir} and {ann_dir} (labels: .png)"
            )
        self.reduce_zero_label, self.num_classes = reduce_zero_label, num_classes
        self._cache: dict[int, tuple[Tensor, Tensor]] | None = {} if cache else None
        ops: list = []
        if train:
            if scale is not None:
                ops.append(RescaleKeepRatio(scale, ratio_range))
            ops += [
                v2.RandomCrop(
                    crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}
                ),
            ]
            if flip_prob > 0:
                ops.append(v2.RandomHorizontalFlip(flip_prob))
            if photometric:
                ops.append(v2.RandomApply([v2.ColorJitter(0.125, 0.5, 0.5, 0.05)], p=0.5))
        self.transform = v2.Compose(ops) if ops else None
        # ToDtype(scale=True) + Normalize as one multiply-add on a plain tensor: the same values (to float
        # rounding) at a tenth of v2.Normalize's cost on a tv_tensors.Image (0.95 ms per 64 px crop)
        std = torch.tensor(STD).view(3, 1, 1)
        self._scale, self._shift = 1 / (255 * std), torch.tensor(MEAN).view(3, 1, 1) / std

    def __len__(self) -> int:
        return len(self.items)

    def load_label(self, i: int) -> np.ndarray:
        lab = np.array(Image.open(self.items[i][1]))
        if lab.ndim != 2:
            raise ValueError(
                f"label map {self.items[i][1]} must be single-channel (mode L or P), got {lab.shape}"
            )
        if self.reduce_zero_label:
            lab = lab.astype(np.int16) - 1
            lab[lab < 0] = IGNORE_INDEX
            lab[lab == IGNORE_INDEX - 1] = IGNORE_INDEX
        lab = lab.astype(np.uint8)
        if self.num_classes is not None:
            top = int(lab[lab != IGNORE_INDEX].max(initial=0))
            if top >= self.num_classes:
                hint = "" if self.reduce_zero_label else " or reduce_zero_label=true (ADE20K's 0 = 'other')"
                raise ValueError(
                    f"label map {self.items[i][1]} holds class {top}, but num_classes is "
                    f"{self.num_classes} (labels 0..{self.num_classes - 1}, {IGNORE_INDEX} ignored): set "
                    f"num_classes to at least {top + 1}{hint}"
                )
        return lab

    def _read(self, i: int) -> tuple[Tensor, Tensor]:
        """uint8 (3, H, W) image and (H, W) label tensors, from the cache when on."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        with Image.open(self.items[i][0]) as im:
            img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        pair = img, torch.from_numpy(self.load_label(i))
        if self._cache is not None:
            self._cache[i] = pair
        return pair

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img, lab = self._read(i)
        if self.transform is not None:
            img, lab = self.transform(tv_tensors.Image(img), tv_tensors.Mask(lab))
        img = img.as_subclass(Tensor).float().mul_(self._scale).sub_(self._shift)
        return img, lab.as_subclass(Tensor).long()


class SegMetric:
    """Confusion-matrix metric: mIoU and per-class IoU (classes absent from prediction and truth are NaN and
    skipped by the mean, as mmseg), pixel accuracy aAcc, mean class accuracy mAcc."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: truth, columns: prediction

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} shapes differ")
        keep = target != self.ignore_index
        t, p = target[keep].long().cpu(), pred[keep].long().cpu()
        if len(t) and int(t.max()) >= self.num_classes:
            raise ValueError(
                f"label value {int(t.max())} >= num_classes {self.num_classes} (and not ignored)"
            )
        self.cm += torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2).view_as(self.cm)

    def compute(self) -> dict[str, float | list[float]]:
        cm = self.cm.double()
        inter, truth, pred = cm.diag(), cm.sum(1), cm.sum(0)
        union = truth + pred - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
        acc = torch.where(truth > 0, inter / truth.clamp(min=1), torch.full_like(inter, float("nan")))
        return dict(
            mIoU=float(iou.nanmean()),
            aAcc=float(inter.sum() / cm.sum().clamp(min=1)),
            mAcc=float(acc.nanmean()),
            IoU=[float(v) for v in iou],
        )
