"""From a model and an image to PNG files: preprocessing, checkpoint loading, the analysis and the figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import draw
from .capture import AttentionMap, capture_attention, gradcam_and_logits, stage_stride

__all__ = [
    "Analysis",
    "analyse",
    "make_sheet",
    "visualize",
    "write_demo_sheets",
    "resolve_data_config",
    "load_image",
    "load_model",
    "find_run_config",
]


# ----- preprocessing and loading ----------------------------------------------------------------------------
def _flatten(node: dict, into: dict[str, Any]) -> dict[str, Any]:
    # nested sections (data:, model:) flattened; the first occurrence of a key wins
    for k, v in node.items():
        if isinstance(v, dict):
            _flatten(v, into)
        else:
            into.setdefault(k, v)
    return into


def find_run_config(checkpoint: str | Path | None) -> dict[str, Any]:
    """What the training run recorded about the checkpoint, flattened: the safetensors header metadata, then
    the trainer's ``config.yaml`` next to the checkpoint (or one folder up) for keys the header lacks."""
    if checkpoint is None:
        return {}
    import yaml

    from ..weights import read_metadata

    p = Path(checkpoint).resolve()
    cfg = {k: v for k, v in read_metadata(p).items() if v is not None}
    for d in (p.parent, p.parent.parent):
        f = d / "config.yaml"
        if f.is_file():
            y = yaml.safe_load(f.read_text()) or {}
            for k, v in _flatten(y if isinstance(y, dict) else {}, {}).items():
                if v is not None:
                    cfg.setdefault(k, v)
            break
    return cfg


def resolve_data_config(
    model: nn.Module, run_config: dict[str, Any] | None = None, img_size: int | None = None
) -> dict[str, Any]:
    """Input size, mean/std, crop_pct, interpolation: the run config's values where it has them, else the
    model's ``pretrained_cfg``. Channel-averaged mean/std for one-channel models (as timm does)."""
    rc = run_config or {}
    pc = getattr(model, "pretrained_cfg", {}) or {}
    in_chans = getattr(model, "in_chans", 3)
    size = img_size or rc.get("img_size") or rc.get("input_size") or pc.get("input_size", (3, 224, 224))
    if isinstance(size, (list, tuple)):
        size = tuple(size[-2:])
    else:
        size = (int(size), int(size))
    mean = list(rc.get("mean") or pc.get("mean") or (0.5,) * in_chans)
    std = list(rc.get("std") or pc.get("std") or (0.5,) * in_chans)
    if len(mean) != in_chans:
        mean = [sum(mean) / len(mean)] * in_chans
    if len(std) != in_chans:
        std = [sum(std) / len(std)] * in_chans
    return dict(
        input_size=(in_chans, *size),
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=float(rc.get("crop_pct") or pc.get("crop_pct") or 1.0),
        interpolation=str(rc.get("interpolation") or pc.get("interpolation") or "bicubic"),
    )


def load_image(path: str | Path | Any, data_config: dict[str, Any], native: bool = False) -> Tensor:
    """Read an image file (or take a PIL image) into a normalised (C, H, W) tensor: EXIF rotation, grey/RGB
    conversion, resize to ``input_size / crop_pct`` and centre crop (timm's eval transform), or the image's
    own size with ``native``."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    from torchvision.transforms import v2 as T

    if isinstance(path, Image.Image):
        img = path
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        try:
            img = ImageOps.exif_transpose(Image.open(path))
        except UnidentifiedImageError as e:
            raise ValueError(f"{path} is not an image PIL can read (PNG, JPEG, ...)") from e
    c, h, w = data_config["input_size"]
    if c not in (1, 3):
        raise ValueError(f"only 1- or 3-channel models can be fed image files; this model takes {c} channels")
    img = img.convert("L" if c == 1 else "RGB")
    interp = T.InterpolationMode(data_config["interpolation"])
    steps: list = [T.ToImage()]
    if not native:
        if h == w:
            steps += [
                T.Resize(math.floor(h / data_config["crop_pct"]), interpolation=interp, antialias=True),
                T.CenterCrop(h),
            ]
        else:
            steps += [T.Resize((h, w), interpolation=interp, antialias=True)]
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(data_config["mean"], data_config["std"])]
    return T.Compose(steps)(img)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_ema", "state_dict_ema", "state_dict", "model"):  # trainer checkpoints wrap the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    return sd


def _shape_hint(sd: dict[str, Tensor], suffixes: Sequence[str], dim: int) -> int | None:
    for k, v in sd.items():
        if any(k.endswith(s) for s in suffixes) and v.ndim >= 2:
            return int(v.shape[dim])
    return None


def load_model(
    name: str | None, checkpoint: str | Path | None = None, pretrained: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``name`` (default: the run config's model) and load ``checkpoint`` into it, with the class count
    and input channels read off the checkpoint itself. Returns (model in eval mode, flattened run config)."""
    from ..models import create_model

    if checkpoint is not None and Path(checkpoint).is_dir():
        checkpoint = Path(checkpoint) / "model.safetensors"
    run_cfg = find_run_config(checkpoint)
    name = name or run_cfg.get("model")
    if not name:
        raise ValueError("no model given: pass --model NAME (see `davit list`)")
    if checkpoint is None:
        model = create_model(name, pretrained=pretrained)
        return model.eval(), run_cfg
    path = Path(checkpoint)
    if path.is_dir():  # a training run folder: its final weights
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{path} is a folder without model.safetensors; pass the weights file itself"
            )
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    arch = run_cfg.get("arch") if isinstance(run_cfg.get("arch"), dict) else {}
    try:
        from .. import weights
    except ImportError:  # before the weights module: plain state dicts in this package's layout
        weights = None
    if weights is None:
        sd = _read_state_dict(path)
        num_classes = _shape_hint(sd, ("head.fc.weight",), 0) or 0
        in_chans = _shape_hint(sd, ("stem.conv.weight",), 1) or 3
    else:  # any layout the loader accepts; class count and input channels read off the tensors
        shapes = weights.infer_arch(weights.to_native(weights.load_state_dict(path))[0])
        num_classes, in_chans = shapes["num_classes"], shapes["in_chans"] or 3
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, **arch)
    if weights is None:
        model.load_state_dict(sd)
    else:
        weights.load_weights(model, path)
    return model.eval(), run_cfg


# ----- analysis ---------------------------------------------------------------------------------------------
@dataclass
class Analysis:
    """Everything the figures need for one image (batch of 1)."""

    image: Tensor  # (C, H, W), normalised model input
    records: dict[str, AttentionMap]
    strides: dict[int, int]
    cam: Tensor | None = None  # (H, W)
    probs: Tensor | None = None  # (num_classes,)
    queries: list[tuple[int, int]] = field(default_factory=list)  # pixel (y, x)

    def last_block(self, kind: str, stages: Sequence[int] | None = None) -> dict[int, AttentionMap]:
        """Per stage, the deepest block of ``kind`` ("spatial" or "channel")."""
        out: dict[int, AttentionMap] = {}
        for rec in self.records.values():
            if rec.kind == kind and (stages is None or rec.stage in stages):
                if rec.stage not in out or rec.block > out[rec.stage].block:
                    out[rec.stage] = rec
        return out


def _to_pixels(queries: Sequence[tuple[float, float]], H: int, W: int) -> list[tuple[int, int]]:
    out = []
    for q in queries:
        if len(q) != 2 or not all(0.0 <= v <= 1.0 for v in q):
            raise ValueError(
                f"query {q} must be (y, x) fractions of the image height and width, each in [0, 1]"
            )
        out.append((min(int(q[0] * H), H - 1), min(int(q[1] * W), W - 1)))
    return out


def analyse(
    model: nn.Module,
    image: Tensor,
    queries: Sequence[tuple[float, float]] | None = None,
    target: int | None = None,
) -> Analysis:
    """Attention of every block, Grad-CAM and class probabilities for one image (C, H, W) or (1, C, H, W).
    Default queries: the centre of the last-stage token with the strongest Grad-CAM (where the evidence for
    the prediction is) and the image centre."""
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
    p = next(model.parameters(), None)
    if p is not None:
        x = x.to(p.device)
    was_training = model.training
    model.eval()
    try:
        records = capture_attention(model, x)
        cam = probs = None
        if getattr(model, "num_classes", 0) > 0 and hasattr(model, "forward_head"):
            cams, logits = gradcam_and_logits(model, x, target)
            cam, probs = cams[0].cpu(), logits[0].float().softmax(-1).cpu()
    finally:
        model.train(was_training)
    H, W = x.shape[-2:]
    for r in records.values():
        r.attn, r.values = r.attn.cpu(), None if r.values is None else r.values.cpu()
    strides = {r.stage: stage_stride(model, r.stage, (H, W), r.map_size) for r in records.values()}
    if queries is None:
        pts = [(H // 2, W // 2)]
        if cam is not None:
            # the centre of the strongest last-stage token: the upsampled map's argmax sits on a plateau that
            # reaches the image corner, which would make a poor query point
            s = strides[max(strides)]
            centres = [
                (min(int((i + 0.5) * s), H - 1), min(int((j + 0.5) * s), W - 1))
                for i in range(-(-H // s))
                for j in range(-(-W // s))
            ]
            pts.insert(0, max(centres, key=lambda p: float(cam[p])))
        pts = list(dict.fromkeys(pts))
    else:
        pts = _to_pixels(queries, H, W)
    return Analysis(x[0].detach().cpu(), records, strides, cam, probs, pts)


def make_sheet(
    model: nn.Module,
    image: Tensor,
    class_names: Sequence[str] | None = None,
    label: str | None = None,
    queries: Sequence[tuple[float, float]] | None = None,
    stages: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    title: str | None = None,
    analysis: Analysis | None = None,
) -> draw.Figure:
    """The summary sheet of one image as a matplotlib Figure (see :func:`draw.sheet_figure`)."""
    a = analysis or analyse(model, image, queries)
    disp = draw.to_display(a.image, mean, std)
    names = list(class_names or [])
    if title is None:
        title = getattr(model, "pretrained_cfg", {}).get("name", type(model).__name__)
    return draw.sheet_figure(
        disp,
        a.last_block("spatial", stages),
        a.last_block("channel", stages),
        a.strides,
        a.queries[0],
        a.cam,
        a.probs,
        names,
        label,
        title,
    )


def visualize(
    model: nn.Module,
    image: Tensor,
    out_dir: str | Path,
    class_names: Sequence[str] | None = None,
    *,
    label: str | None = None,
    queries: Sequence[tuple[float, float]] | None = None,
    stages: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    target: int | None = None,
    max_heads: int = 8,
    top_k: int = 4,
    title: str | None = None,
) -> dict[str, Path]:
    """Write all figures for one normalised image (C, H, W) into ``out_dir``: ``spatial_stage{i}.png``,
    ``channel_stage{i}.png``, ``gradcam.png`` (models with a classifier) and ``sheet.png``.
    Returns {figure name: path}."""
    a = analyse(model, image, queries, target)
    disp = draw.to_display(a.image, mean, std)
    names = list(class_names or [])
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for st, rec in a.last_block("spatial", stages).items():
        fig = draw.spatial_figure(rec, disp, a.queries, a.strides[st], max_heads)
        paths[f"spatial_stage{st}"] = draw.save(fig, out / f"spatial_stage{st}.png")
    for st, rec in a.last_block("channel", stages).items():
        fig = draw.channel_figure(rec, disp, a.strides[st], max_groups=min(max_heads, 4), top_k=top_k)
        paths[f"channel_stage{st}"] = draw.save(fig, out / f"channel_stage{st}.png")
    if a.cam is not None and a.probs is not None:
        paths["gradcam"] = draw.save(
            draw.gradcam_figure(disp, a.cam, a.probs, names, label), out / "gradcam.png"
        )
    sheet = make_sheet(model, image, names, label, stages=stages, mean=mean, std=std, title=title, analysis=a)
    paths["sheet"] = draw.save(sheet, out / "sheet.png")
    return paths


def write_demo_sheets(
    model: nn.Module,
    images: Tensor | Sequence[Tensor],
    labels: Sequence[int] | None,
    class_names: Sequence[str] | None,
    out_dir: str | Path,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[Path]:
    """One summary sheet per image (``sheet_{k}.png``) for normalised images (N, C, H, W) or a list of (C, H,
    W); ``labels`` are the true class indices (or None). Pass the normalisation's mean/std for faithful
    colours; without them each image is shown stretched to its own range."""
    names = list(class_names or [])
    out = Path(out_dir)
    paths = []
    for k, img in enumerate(images):
        label = None
        if labels is not None:
            t = int(labels[k])
            label = names[t] if t < len(names) else f"class {t}"
        fig = make_sheet(model, img, names, label, mean=mean, std=std)
        paths.append(draw.save(fig, out / f"sheet_{k}.png"))
    return paths
