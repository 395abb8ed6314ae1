"""`davit viz`: attention maps, Grad-CAM and a summary sheet for images, as PNG files.

Heavy imports (matplotlib, torchvision) happen inside the command so `davit --help` stays fast.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

EXAMPLE = """examples:
  davit viz fashion-mnist:0 fashion-mnist:1 --checkpoint output/demo/RUN   # a `make demo` run folder
  davit viz shirt.png --model davit_atto --checkpoint model.safetensors --out viz/
  davit viz a.jpg b.jpg --model davit_tiny --pretrained --out viz/ --queries 0.5,0.5 0.2,0.8 --stages 0 2
"""


def _query(text: str) -> tuple[float, float]:
    m = re.fullmatch(r"\s*([0-9.]+)\s*,\s*([0-9.]+)\s*", text)
    if not m or not all(0.0 <= float(v) <= 1.0 for v in m.groups()):
        raise argparse.ArgumentTypeError(
            f"query {text!r} must be Y,X as fractions of the image height and width in [0, 1], e.g. 0.5,0.5"
        )
    return float(m.group(1)), float(m.group(2))


def _img_size(text: str) -> int | str:
    if text == "native":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--img-size takes a positive integer or 'native', got {text!r}")
    return int(text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz",
        help="attention maps (window + channel), Grad-CAM and a summary sheet as PNGs",
        description="Draw what DaViT attends to. For each image: the spatial window attention of query\n"
        "points per stage and head, the channel-attention matrices with the maps of the most attended\n"
        "channels, Grad-CAM for the top prediction, and a summary sheet. Writes OUT/<image name>/*.png.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (any PIL-readable format), or fashion-mnist:N for test image N",
    )
    p.add_argument("--model", default=None, help="variant name (default: the checkpoint's run config)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="weights file (.safetensors, .pth, ...; any layout) or a training run folder",
    )
    p.add_argument("--pretrained", action="store_true", help="use the released weights (no --checkpoint)")
    p.add_argument("--out", default="viz", help="output folder (default: ./viz)")
    p.add_argument(
        "--queries",
        nargs="+",
        type=_query,
        default=None,
        metavar="Y,X",
        help="query points as fractions of height,width (default: Grad-CAM peak and the centre)",
    )
    p.add_argument(
        "--stages", nargs="+", type=int, default=None, metavar="I", help="0-based stages (default all)"
    )
    p.add_argument(
        "--img-size",
        type=_img_size,
        default=None,
        help="input side, or 'native' for the image's own size (default: run config / model metadata)",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="file with one class name per line, or a comma-separated list (default: run config)",
    )
    p.add_argument(
        "--target", type=int, default=None, help="class index for Grad-CAM (default: top prediction)"
    )
    p.add_argument("--max-heads", type=int, default=8, help="heads / groups drawn per stage at most")
    p.add_argument("--top-k", type=int, default=4, help="most attended channels drawn per group")
    p.set_defaults(func=cmd_viz)


def _class_names(arg: str | None, run_cfg: dict) -> list[str]:
    if arg:
        p = Path(arg)
        if p.is_file():
            return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        return [s.strip() for s in arg.split(",")]
    names = run_cfg.get("class_names") or run_cfg.get("classes")  # `classes`: the trainer's header key
    return [str(n) for n in names] if isinstance(names, list) else []


def _source(arg: str, names: list[str]) -> tuple[Any, str | None, str]:
    """(image file or PIL image, true label name or None, output folder name) of an IMAGE argument."""
    m = re.fullmatch(r"fashion-mnist:(\d+)", arg)
    if not m:
        return arg, None, Path(arg).stem
    from .data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST

    ds = FashionMNIST(split="test")
    i = int(m.group(1))
    if i >= len(ds):
        raise ValueError(f"{arg}: the Fashion-MNIST test set has images 0..{len(ds) - 1}")
    img, y = ds[i]
    classes = names or list(FASHION_MNIST_CLASSES)
    return img, classes[int(y)] if int(y) < len(classes) else f"class {int(y)}", f"fashion-mnist_{i}"


def cmd_viz(args: argparse.Namespace) -> int:
    from .viz import load_image, load_model, resolve_data_config, visualize

    if args.checkpoint and args.pretrained:
        raise ValueError("give either --checkpoint FILE or --pretrained, not both")
    model, run_cfg = load_model(args.model, args.checkpoint, pretrained=args.pretrained)
    if args.checkpoint is None and not args.pretrained:
        print("warning: no --checkpoint or --pretrained: drawing a randomly initialised model")
    n_stages = len(model.stages)
    for s in args.stages or []:
        if not 0 <= s < n_stages:
            raise ValueError(f"--stages {s} is out of range: this model has stages 0..{n_stages - 1}")
    native = args.img_size == "native"
    dcfg = resolve_data_config(model, run_cfg, None if native else args.img_size)
    names = _class_names(args.class_names, run_cfg)
    if names and model.num_classes and len(names) != model.num_classes:
        raise ValueError(f"{len(names)} class names given but the model has {model.num_classes} classes")
    out, seen = Path(args.out), set()
    for path in args.images:
        src, label, stem = _source(path, names)
        x = load_image(src, dcfg, native=native)
        while stem in seen:
            stem += "_"
        seen.add(stem)
        paths = visualize(
            model,
            x,
            out / stem,
            names,
            label=label,
            queries=args.queries,
            stages=args.stages,
            mean=dcfg["mean"],
            std=dcfg["std"],
            target=args.target,
            max_heads=args.max_heads,
            top_k=args.top_k,
            title=f"{model.pretrained_cfg['name']} on {path if label else Path(path).name}",
        )
        print(f"{path}: {len(paths)} figures in {out / stem}  (summary: {paths['sheet']})")
    return 0
