"""COCO-format instance data (image folder + instances JSON) and pycocotools evaluation.

Multi-scale resizing is not done here: Mask R-CNN's own transform draws a short side from ``min_size`` per
image in training (the recipe's 480..800, max 1333) and uses the last one in evaluation. The dataset flips,
applies the recipe's resize-and-crop policy to a share of the training images (``crop_prob``) and converts;
category ids are kept as they are (COCO 1..90 -> ``num_classes=91``, scenes 1..10 -> 11).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

__all__ = [
    "CocoInstances",
    "ResizeCrop",
    "collate_detection",
    "coco_results",
    "coco_evaluate",
    "COCO_METRICS",
    "format_metric",
]

# names of COCOeval.stats[0:6], the numbers every Mask R-CNN table reports
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class ResizeCrop(v2.Transform):
    """The second policy of the official DaViT/Swin Mask R-CNN training pipeline (from DETR): with
    probability ``p``, rescale keeping the aspect ratio to a short side drawn from ``short_sides`` (long side
    at most ``max_size``), then crop a random ``h x w`` window with h and w drawn in ``size_range`` (mmdet's
    ``RandomCrop(crop_type="absolute_range", allow_negative_crop=True)``: an image may keep no box). The
    detector's own transform then rescales the crop to a short side in ``min_sizes`` (the first policy's
    480..800), as the pipeline's final ``Resize(override=True)`` does. Boxes are shifted and clipped; those
    left empty are dropped with their labels and masks by ``SanitizeBoundingBoxes`` afterwards."""

    def __init__(
        self, p: float, short_sides: Sequence[int], size_range: Sequence[int], max_size: int = 1333
    ) -> None:
        super().__init__()
        self.p, self.short_sides, self.size_range, self.max_size = p, list(short_sides), size_range, max_size

    def make_params(self, flat_inputs: list) -> dict:
        if torch.rand(1).item() >= self.p:
            return dict(size=None)
        h, w = next(v2.functional.get_size(x) for x in flat_inputs if isinstance(x, tv_tensors.Image))
        short = self.short_sides[int(torch.randint(len(self.short_sides), ()))]
        r = min(short / min(h, w), self.max_size / max(h, w))
        h, w = max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5))
        lo, hi = self.size_range
        ch = int(torch.randint(min(h, lo), min(h, hi) + 1, ()))
        cw = int(torch.randint(min(w, lo), min(w, hi) + 1, ()))
        top = int(torch.randint(h - ch + 1, ()))
        left = int(torch.randint(w - cw + 1, ()))
        return dict(size=(h, w), box=(top, left, ch, cw))

    def transform(self, inpt, params: dict):
        if params["size"] is None:
            return inpt
        out = v2.functional.resize(inpt, params["size"], antialias=True)  # masks: nearest, by type
        return v2.functional.crop(out, *params["box"])


def format_metric(v: float) -> str:
    """``v`` to 4 decimals, or ``n/a`` for pycocotools' -1 (no ground truth of that kind, e.g. APl when no
    object is large). Every metric reported here is >= 0, so any negative value is that marker."""
    return "n/a" if v < 0 else f"{v:.4f}"


class CocoInstances(Dataset):
    """(float image (3, H, W) in [0, 1], target with boxes xyxy, labels, masks (N, H, W) uint8, image_id).

    Crowd annotations are dropped from training targets (as torchvision's references do); evaluation uses
    the JSON through pycocotools, which handles them. ``crop_prob`` > 0 adds the official pipeline's
    resize-and-crop policy (:class:`ResizeCrop`, with ``crop_short_sides``/``crop_size_range``/``max_size``)
    in training.
    """

    def __init__(
        self,
        img_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        train: bool = False,
        flip_prob: float = 0.5,
        crop_prob: float = 0.0,
        crop_short_sides: Sequence[int] = (400, 500, 600),
        crop_size_range: Sequence[int] = (384, 600),
        max_size: int = 1333,
    ) -> None:
        for p, what in ((img_dir, "image folder"), (ann_file, "instances JSON")):
            if not os.path.exists(p):
                raise FileNotFoundError(f"COCO {what} {os.fspath(p)!r} not found")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on load
            base = CocoDetection(os.fspath(img_dir), os.fspath(ann_file))
        self.coco: COCO = base.coco
        self.ds = wrap_dataset_for_transforms_v2(
            base, target_keys=("image_id", "boxes", "labels", "masks", "iscrowd")
        )
        ops: list = [v2.ToImage()]
        if train and flip_prob > 0:
            ops.append(v2.RandomHorizontalFlip(flip_prob))
        if train and crop_prob > 0:
            ops.append(ResizeCrop(crop_prob, crop_short_sides, crop_size_range, max_size))
        ops += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(labels_getter=_labels_getter)]
        self.transform = v2.Compose(ops)
        self.train = train
        self.num_classes = max(self.coco.getCatIds(), default=0) + 1
        self.category_names = {c["id"]: c["name"] for c in self.coco.loadCats(self.coco.getCatIds())}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        img, tgt = self.ds[i]
        h, w = img.height, img.width
        if "boxes" not in tgt:  # an image without annotations
            tgt = dict(
                image_id=tgt["image_id"],
                iscrowd=torch.zeros(0, dtype=torch.int64),
                boxes=tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                labels=torch.zeros(0, dtype=torch.int64),
                masks=tv_tensors.Mask(torch.zeros(0, h, w, dtype=torch.uint8)),
            )
        keep = torch.as_tensor(tgt["iscrowd"]) == 0
        # indexing unwraps tv_tensors: wrap again so the v2 transforms know boxes and masks
        tgt = dict(
            image_id=tgt["image_id"],
            labels=tgt["labels"][keep],
            boxes=tv_tensors.wrap(tgt["boxes"][keep], like=tgt["boxes"]),
            masks=tv_tensors.wrap(tgt["masks"][keep], like=tgt["masks"]),
        )
        img, tgt = self.transform(img, tgt)
        return img, dict(
            boxes=tgt["boxes"].as_subclass(Tensor).float(),
            labels=tgt["labels"].long(),
            masks=tgt["masks"].as_subclass(Tensor).to(torch.uint8),
            image_id=torch.tensor(tgt["image_id"]),
        )


def _labels_getter(inputs):  # SanitizeBoundingBoxes: drop degenerate boxes with their labels and masks
    return inputs[1]["labels"]


def collate_detection(batch: list) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Detection models take lists (images differ in size)."""
    return [b[0] for b in batch], [b[1] for b in batch]


def coco_results(
    outputs: Iterable[dict[str, Tensor]], image_ids: Iterable[int], mask_threshold: float = 0.5
) -> list[dict]:
    """torchvision detector outputs -> COCO result dicts (xywh boxes, RLE masks when the output has masks)."""
    res = []
    for out, img_id in zip(outputs, image_ids):
        xyxy = out["boxes"].detach().cpu().float()  # the caller's own tensor when it is float on the CPU
        boxes = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)  # a new tensor: xyxy stays untouched
        masks = None
        if "masks" in out and len(out["masks"]):
            m = (out["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            masks = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
        for j, (b, s, c) in enumerate(zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist())):
            r = dict(image_id=int(img_id), category_id=int(c), bbox=[round(v, 2) for v in b], score=float(s))
            if masks is not None:
                r["segmentation"] = dict(size=masks[j]["size"], counts=masks[j]["counts"].decode("ascii"))
            res.append(r)
    return res


def coco_evaluate(
    coco_gt: COCO, results: list[dict], iou_types: Iterable[str] = ("bbox", "segm"), verbose: bool = False
) -> dict[str, float]:
    """pycocotools AP/AP50/AP75/APs/APm/APl per IoU type, keyed ``box_AP50``, ``mask_AP``, ...

    Empty ``results`` are evaluated too (every AP is then 0): pycocotools' ``loadRes`` cannot take an empty
    list, so the detections object is built directly.
    """
    img_ids = sorted(coco_gt.getImgIds())
    scores: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type == "segm" and results and "segmentation" not in results[0]:
            continue
        with contextlib.redirect_stdout(io.StringIO()) as log:
            if results:
                dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds fields in place
            else:
                dt = COCO()
                dt.dataset = dict(
                    images=coco_gt.dataset["images"], categories=coco_gt.dataset["categories"], annotations=[]
                )
                dt.createIndex()
            ev = COCOeval(coco_gt, dt, iou_type)
            ev.params.imgIds = img_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            print(f"[{iou_type}]\n{log.getvalue()}")
        prefix = "box" if iou_type == "bbox" else "mask"
        for name, v in zip(COCO_METRICS, ev.stats[:6]):
            scores[f"{prefix}_{name}"] = float(v)
    return scores
