"""Drawing predictions: boxes, masks and labels for detection, a colour overlay for segmentation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data.images import BadSample, decode_image
from .config import TaskConfig
from .seg_data import MEAN, STD
from .segmentation import segment_inference

__all__ = ["predict_files", "palette", "Predictions"]


class Predictions(NamedTuple):
    """What :func:`predict_files` did: the PNGs written (in input order) and the files it could not read."""

    written: list[Path]
    skipped: list[BadSample]


def palette(n: int) -> torch.Tensor:
    """(n, 3) uint8 distinct colours; class 0 (background in the scenes) is black."""
    g = torch.Generator().manual_seed(0)
    p = torch.randint(40, 256, (n, 3), generator=g, dtype=torch.uint8)
    p[0] = 0
    return p


def _names(cfg: TaskConfig) -> dict[int, str]:
    """Label id -> class name: the scenes' meta.json, else the categories of the run's COCO instances JSON.

    COCO category ids are kept as they are in the JSON (1..90 with gaps), so this maps ids, not positions.
    Ids without a name are drawn as the number.
    """
    root = Path(cfg.data) if cfg.data else None
    if root is not None and (root / "meta.json").is_file():
        m = json.loads((root / "meta.json").read_text())
        return dict(enumerate(["background", *m["classes"]]))
    # the val JSON first: a COCO train JSON is ~0.5 GB and every file of a run carries the same categories
    candidates = [cfg.val_ann, cfg.train_ann]
    if root is not None and cfg.task == "detect":
        candidates += [root / "annotations" / f"instances_{s}.json" for s in ("val", "train")]
    for ann in candidates:
        if ann is None or not Path(ann).is_file():
            continue
        try:
            cats = json.loads(Path(ann).read_text())["categories"]
            return {int(c["id"]): str(c["name"]) for c in cats}
        except (OSError, ValueError, KeyError, TypeError) as e:
            # names only label the drawing: a broken JSON must not stop predictions, but say why ids are drawn
            warnings.warn(
                f"no class names from {ann} ({type(e).__name__}: {e}); drawing label ids", stacklevel=3
            )
    return {}


def _output_names(files: list[Path]) -> list[str]:
    """One distinct output stem per input: a repeated stem (``x/a.png``, ``y/a.png``, or ``a.png`` beside
    ``a.jpg``) gets ``-2``, ``-3``, ... so no prediction overwrites another. Case is ignored in the
    comparison because ``A.png`` and ``a.png`` are one file on macOS and Windows disks."""
    own = {f.stem.casefold() for f in files}  # a renamed file must not take another input's own name
    taken: set[str] = set()
    names = []
    for f in files:
        name, n = f.stem, 1
        while name.casefold() in taken or (n > 1 and name.casefold() in own):
            n += 1
            name = f"{f.stem}-{n}"
        taken.add(name.casefold())
        names.append(name)
    return names


@torch.no_grad()
def predict_files(
    model: nn.Module, cfg: TaskConfig, files: list[Path], out_dir: str | Path, score: float = 0.5
) -> Predictions:
    """Run ``model`` on each image file and write ``out_dir/<stem>.png`` with the prediction drawn.

    Images are decoded like the classification data (any PIL mode, 16-bit grey scaled to 8 bits, EXIF
    rotation, transparency over white). A file that cannot be decoded (not an image, truncated, empty) is
    skipped and returned in ``skipped`` with the reason; the others are still written. Inputs whose stems
    repeat get distinct names (``a.png``, ``a-2.png``, ...); ``written[i]`` is the output of the i-th
    readable input.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _names(cfg)
    written: list[Path] = []
    skipped: list[BadSample] = []
    colours = palette(max(cfg.num_classes or 1, max(names, default=0) + 1))
    model.eval()
    dev = next(model.parameters()).device  # inputs go where the model is; drawing happens on the CPU
    for f, stem in zip(files, _output_names(files)):
        pil = decode_image(str(f), "RGB")
        if isinstance(pil, BadSample):
            skipped.append(pil)
            continue
        img = TF.pil_to_tensor(pil)  # uint8 (3, H, W)
        if cfg.task == "detect":
            det = {k: v.cpu() for k, v in model([img.to(dev).float() / 255])[0].items()}
            keep = det["scores"] >= score
            labels = det["labels"][keep].tolist()
            drawn = img
            if keep.any():
                masks = det["masks"][keep, 0] > 0.5
                drawn = draw_segmentation_masks(
                    drawn, masks, alpha=0.45, colors=[tuple(colours[c].tolist()) for c in labels]
                )
                text = [f"{names.get(c, c)} {s:.2f}" for c, s in zip(labels, det["scores"][keep].tolist())]
                drawn = draw_bounding_boxes(
                    drawn,
                    det["boxes"][keep],
                    text,
                    colors=[tuple(colours[c].tolist()) for c in labels],
                    width=2,
                )
        else:
            x = TF.normalize(img.float() / 255, MEAN, STD)[None].to(dev)
            pred = segment_inference(
                model, x, cfg.test_mode, cfg.test_crop, cfg.test_stride, cfg.test_scales, cfg.test_flip
            )[0].argmax(0).cpu()
            overlay = colours[pred].permute(2, 0, 1)
            drawn = (0.5 * img.float() + 0.5 * overlay.float()).round().to(torch.uint8)
        p = out / f"{stem}.png"
        TF.to_pil_image(drawn).save(p)
        written.append(p)
    return Predictions(written, skipped)
