"""`davit train`, `davit eval`, `davit predict` and `davit demo`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .config import add_config_args, config_from_args, finalize

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a DaViT (single process, or DDP/FSDP under torchrun)",
        description="Train a DaViT. Flags use timm's names; --preset imagenet is the official "
        "recipe (SPEC 5). Multi-GPU/node: torchrun --nproc-per-node=N -m davit train ...",
    )
    add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint: top-1/5, per-class accuracy, confusion matrix")
    p.add_argument("checkpoint", help="weights file (.safetensors from a run, or any layout) or a run folder")
    p.add_argument("--model", default=None, help="variant (default: from the weights' metadata)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None, help="default: the model metadata's")
    p.add_argument("--interpolation", default=None, help="default: the model metadata's")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--device", default="auto")
    p.add_argument("--results-file", default=None, help="write the results as JSON here")
    p.add_argument("--confusion-png", default=None, help="also draw the confusion matrix here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify images: top-k class names with probabilities")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="weights file (.safetensors from a run) or run folder")
    p.add_argument("--model", default=None)
    p.add_argument("--use-ema", action="store_true")
    p.add_argument("-k", "--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="train a small DaViT on Fashion-MNIST on the CPU, evaluate, report")
    p.add_argument("--output", default="output/demo")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget; epochs are chosen to fit")
    p.add_argument("--epochs", type=int, default=None, help="train exactly this many epochs (no budget)")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_demo)


# ----- train ------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    cfg = finalize(config_from_args(args))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    _threads()
    from .trainer import NonFiniteLossError, train

    try:
        res = train(cfg)
    except NonFiniteLossError as e:
        print(f"davit train: stopped: {e}", file=sys.stderr)
        return 3
    from .distributed import env_rank_world

    if not res.get("stopped") and "top1" in res and env_rank_world()[0] == 0:  # once per job, not per rank
        print(f"final top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  run folder: {res['run_dir']}")
    return 0


def _threads() -> None:
    # under torchrun several processes share the cores: one intra-op pool each, sized to its share
    import os

    if "LOCAL_WORLD_SIZE" in os.environ and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))


# ----- eval / predict --------------------------------------------------------------------------------
def _weights_path(path: str, use_ema: bool) -> str:
    p = Path(path)
    if p.is_dir():
        cand = p / ("model_ema.safetensors" if use_ema else "model.safetensors")
        if not cand.exists():
            raise FileNotFoundError(f"{p} has no {cand.name}: pass a weights file or a finished run folder")
        return str(cand)
    if use_ema and p.suffix == ".safetensors" and p.name == "model.safetensors":
        ema = p.with_name("model_ema.safetensors")
        if not ema.exists():
            raise FileNotFoundError(f"--use-ema: {ema} not found (was the run trained with --model-ema?)")
        return str(ema)
    return str(p)


def _eval_transform(meta: dict[str, Any], img_size=None, crop_pct=None, interpolation=None):
    from ..data import build_transform

    return build_transform(
        False,
        img_size or meta["img_size"],
        in_chans=meta["in_chans"],
        interpolation=interpolation or meta["interpolation"],
        mean=meta["mean"],
        std=meta["std"],
        crop_pct=crop_pct or meta["crop_pct"],
        simple=bool(meta.get("simple_aug", False)),
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import build_dataset, build_loader
    from .distributed import pick_device
    from .metrics import evaluate
    from .setup import model_from_metadata

    path = _weights_path(args.checkpoint, args.use_ema)
    net, meta = model_from_metadata(path, args.model, use_ema=args.use_ema)
    dev = pick_device(args.device, 0)
    net.to(dev).eval()
    tf = _eval_transform(meta, args.img_size, args.crop_pct, args.interpolation)
    ds = build_dataset(
        args.dataset, args.data_dir, args.split, transform=tf, mode="L" if meta["in_chans"] == 1 else "RGB"
    )
    classes = list(meta.get("classes") or ds.classes)
    if args.num_samples:
        from .setup import _Head

        ds = _Head(ds, args.num_samples)
    loader = build_loader(ds, args.batch_size, False, workers=args.workers)
    res = evaluate(net, loader, dev, net.num_classes, amp=args.amp)
    res.update(
        checkpoint=path,
        model=meta["model"],
        dataset=args.dataset,
        split=args.split,
        classes=classes,
        crop_pct=args.crop_pct or meta["crop_pct"],
        interpolation=args.interpolation or meta["interpolation"],
        skipped_files=len(loader.bad),
    )
    print(
        f"{meta['model']} on {args.dataset}/{args.split} ({res['count']} images): top-1 {res['top1']:.2f}%  "
        f"top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}"
    )
    for c, a in zip(classes, res["per_class_acc"]):
        print(f"  {c:<20} {a:6.2f}%")
    if loader.bad:
        print(loader.bad_report())
    if args.results_file:
        Path(args.results_file).write_text(json.dumps(res, indent=2))
        print(f"results written to {args.results_file}")
    if args.confusion_png:
        from .report import plot_confusion

        plot_confusion(res["confusion"], classes, args.confusion_png)
    return 0


def predict(net: torch.nn.Module, meta: dict[str, Any], images: list[str], top_k: int = 5) -> list[dict]:
    """Top-k ``{"class", "index", "prob"}`` per image; unreadable files get an ``error`` entry instead."""
    from ..data import decode_image
    from ..data.images import BadSample

    tf = _eval_transform(meta)
    classes = meta.get("classes") or [str(i) for i in range(net.num_classes)]
    out = []
    for path in images:
        img = decode_image(path, "L" if meta["in_chans"] == 1 else "RGB")
        if isinstance(img, BadSample):
            out.append({"image": path, "error": img.reason})
            continue
        with torch.no_grad():
            prob = net(tf(img)[None].to(next(net.parameters()).device)).float().softmax(-1)[0]
        p, idx = prob.topk(min(top_k, len(prob)))
        out.append(
            {
                "image": path,
                "top_k": [
                    {"class": classes[i], "index": int(i), "prob": round(float(q), 6)}
                    for q, i in zip(p.tolist(), idx.tolist())
                ],
            }
        )
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from .setup import model_from_metadata

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    net, meta = model_from_metadata(
        _weights_path(args.checkpoint, args.use_ema), args.model, use_ema=args.use_ema
    )
    net.eval()
    res = predict(net, meta, args.images, args.top_k)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for r in res:
            if "error" in r:
                print(f"{r['image']}: cannot read: {r['error']}")
                continue
            print(f"{r['image']}:")
            for t in r["top_k"]:
                print(f"  {t['prob'] * 100:6.2f}%  {t['class']}")
    return 1 if any("error" in r for r in res) else 0


# ----- demo ------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.output, args.epochs, args.data_dir, args.minutes)
