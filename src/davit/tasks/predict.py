"""Drawing predictions: boxes, masks and labels for detection, a colour overlay for segmentation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .config import TaskConfig
from .seg_data import MEAN, STD
from .segmentation import segment_inference

__all__ = ["predict_files", "palette"]


def palette(n: int) -> torch.Tensor:
    """(n, 3) uint8 distinct colours; class 0 (background in the scenes) is black."""
    g = torch.Generator().manual_seed(0)
    p = torch.randint(40, 256, (n, 3), generator=g, dtype=torch.uint8)
    p[0] = 0
    return p


def _names(cfg: TaskConfig) -> list[str]:
    meta = Path(cfg.data) / "meta.json" if cfg.data else None
    if meta is not None and meta.is_file():
        m = json.loads(meta.read_text())
        return ["background", *m["classes"]]
    return [str(i) for i in range(cfg.num_classes or 0)]


@torch.no_grad()
def predict_files(
    model: nn.Module, cfg: TaskConfig, files: list[Path], out_dir: str | Path, score: float = 0.5
) -> list[Path]:
    """Run ``model`` on each image file and write ``out_dir/<stem>.png`` with the prediction drawn."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names, written = _names(cfg), []
    colours = palette(max(cfg.num_classes or 1, len(names)))
    model.eval()
    dev = next(model.parameters()).device  # inputs go where the model is; drawing happens on the CPU
    for f in files:
        img = TF.pil_to_tensor(Image.open(f).convert("RGB"))  # uint8 (3, H, W)
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
                text = [
                    f"{names[c] if c < len(names) else c} {s:.2f}"
                    for c, s in zip(labels, det["scores"][keep].tolist())
                ]
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
        p = out / f"{f.stem}.png"
        TF.to_pil_image(drawn).save(p)
        written.append(p)
    return written
