"""`davit train`, `davit eval`, `davit predict` and `davit demo`."""

from __future__ import annotations

import argparse
import json
import math
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
    p.add_argument(
        "checkpoint",
        help="weights file (.safetensors from a run, or any layout), training checkpoint (ckpt-*.pt, "
        "best.pt), run folder, or a --output folder of runs (its newest finished run)",
    )
    p.add_argument("--model", default=None, help="variant (default: from the weights' metadata)")
    p.add_argument(
        "--dataset", default=None, help="default: the run's (its config.yaml), else fashion-mnist"
    )
    p.add_argument("--data-dir", default=None, help="default: the run's, for the run's dataset")
    p.add_argument("--split", default=None, help="default: the run's validation split, else val")
    p.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None, help="default: the model metadata's")
    p.add_argument("--interpolation", default=None, help="default: the model metadata's")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument(
        "--tta-flip",
        action="store_true",
        help="test-time augmentation: score each image as the mean logits of it and its mirror image",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--results-file", "--json", dest="results_file", default=None, help="write the results as JSON here"
    )
    p.add_argument("--confusion-png", default=None, help="also draw the confusion matrix here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify images: top-k class names with probabilities")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="weights file (.safetensors from a run), training checkpoint (ckpt-*.pt, best.pt), run folder, "
        "or a --output folder of runs (its newest finished run)",
    )
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
def _newest_run(folder: Path, weights: str) -> Path | None:
    """The most recently finished run (by its ``weights`` file) among the run folders inside ``folder`` (a
    ``davit train --output`` folder), None when it holds none."""
    runs = [d for d in folder.iterdir() if d.is_dir() and (d / weights).is_file()]
    return max(runs, key=lambda d: (d / weights).stat().st_mtime) if runs else None


def _weights_path(path: str, use_ema: bool) -> str:
    p = Path(path)
    if not p.exists():  # checked first: the metadata reader would report it as "does not say which model"
        raise FileNotFoundError(
            f"{p} not found: pass a weights file (.safetensors, .pth), a training checkpoint or a run folder "
            "of davit train"
        )
    if p.is_dir():
        name = "model_ema.safetensors" if use_ema else "model.safetensors"
        if (p / name).is_file():
            return str(p / name)
        # `davit train --output runs/x` puts each run in runs/x/<model-dataset-time>/: take the newest
        newest = _newest_run(p, name) if not (p / "config.yaml").is_file() else None
        if newest is not None:
            others = sum(1 for d in p.iterdir() if (d / name).is_file()) - 1
            note = f" (the newest of {others + 1} runs there)" if others else ""
            print(f"note: {p} is an output folder; using its run {newest.name}{note}", file=sys.stderr)
            return str(newest / name)
        ckpts = p / "checkpoints"
        hint = (
            f" (unfinished run: pass a training checkpoint such as {ckpts}/best.pt)"
            if ckpts.is_dir()
            else ""
        )
        raise FileNotFoundError(
            f"{p} has no {name}{hint}: pass a weights file, a training checkpoint, a finished run folder "
            "or a --output folder holding finished runs"
        )
    if use_ema and p.suffix == ".safetensors" and p.name == "model.safetensors":
        ema = p.with_name("model_ema.safetensors")
        if not ema.exists():
            raise FileNotFoundError(f"--use-ema: {ema} not found (was the run trained with --model-ema?)")
        return str(ema)
    return str(p)


def _run_config(path: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The training config of the run the weights come from: inside a training checkpoint, else the run's
    config.yaml next to the weights (or above a checkpoints/ folder); {} when there is none."""
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    import yaml

    p = Path(path)
    for d in (p.parent, p.parent.parent):
        f = d / "config.yaml"
        if f.is_file():
            try:
                cfg = yaml.safe_load(f.read_text())
            except yaml.YAMLError:
                return {}  # a damaged config only loses the defaults: the flags still work
            return cfg if isinstance(cfg, dict) else {}
    return {}


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


def _check_classes(path: str, net: torch.nn.Module, meta: dict[str, Any], ds, where: str) -> None:
    """Refuse a dataset whose labels would not mean the model's classes (before any image is read)."""
    n_model, classes = net.num_classes, meta.get("classes")
    fix = (
        "evaluate it on the dataset it was trained on (--dataset, --data-dir, --split), or pass the "
        "weights trained on this one"
    )
    if len(ds.classes) > n_model or (len(ds.classes) < n_model and list(ds.classes) != classes):
        raise ValueError(
            f"{path} holds a {n_model}-class model but {where} has {len(ds.classes)} classes: {fix}"
        )
    if classes and len(classes) == len(ds.classes) and list(classes) != list(ds.classes):
        diff = [f"{k}: {a!r} vs {b!r}" for k, (a, b) in enumerate(zip(classes, ds.classes)) if a != b]
        raise ValueError(
            f"the classes of {where} differ from those {path} was trained on (label {', '.join(diff[:3])}"
            f"{', ...' if len(diff) > 3 else ''}): {fix}"
        )


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import build_dataset, build_loader
    from ..data.loader import format_bad
    from .distributed import pick_device
    from .metrics import evaluate
    from .setup import model_from_metadata

    path = _weights_path(args.checkpoint, args.use_ema)
    net, meta = model_from_metadata(path, args.model, use_ema=args.use_ema)
    # the data the run was trained on, unless the command line says otherwise
    run = _run_config(path, meta)
    dataset = args.dataset or run.get("dataset") or "fashion-mnist"
    same = dataset == run.get("dataset")
    data_dir = args.data_dir if args.data_dir is not None else (run.get("data_dir") if same else None)
    split = args.split or (run.get("val_split") if same else None) or "val"
    dev = pick_device(args.device, 0)
    if dev.type == "cpu":  # large batches' activations reused, not re-mapped per batch (davit.alloc)
        from ..alloc import tune_malloc

        print(tune_malloc())
    net.to(dev).eval()
    tf = _eval_transform(meta, args.img_size, args.crop_pct, args.interpolation)
    ds = build_dataset(dataset, data_dir, split, transform=tf, mode="L" if meta["in_chans"] == 1 else "RGB")
    where = f"{dataset}/{split}" + (f" in {data_dir}" if data_dir else "")
    _check_classes(path, net, meta, ds, where)
    classes = list(meta.get("classes") or ds.classes)
    if args.num_samples:
        from .setup import _head

        ds = _head(ds, args.num_samples, "--num-samples")
    loader = build_loader(ds, args.batch_size, False, workers=args.workers)
    res = evaluate(net, loader, dev, net.num_classes, amp=args.amp, flip=args.tta_flip)
    skipped = res.pop("skipped")
    res.update(
        checkpoint=path,
        model=meta["model"],
        dataset=dataset,
        data_dir=data_dir,
        split=split,
        classes=classes,
        tta_flip=args.tta_flip,
        crop_pct=args.crop_pct or meta["crop_pct"],
        interpolation=args.interpolation or meta["interpolation"],
        skipped=[{"path": b.path, "reason": b.reason} for b in skipped],
    )
    print(
        f"{meta['model']} on {dataset}/{split} ({res['count']} images): top-1 {res['top1']:.2f}%  "
        f"top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}" + ("  (flip TTA)" if args.tta_flip else "")
    )
    for c, a in zip(classes, res["per_class_acc"]):
        print(f"  {c:<20} {a:6.2f}%" if not math.isnan(a) else f"  {c:<20}  (no images)")
    if skipped:
        print(format_bad(skipped))
    if args.results_file:
        # classes without images have no accuracy: null, as NaN is not JSON
        res["per_class_acc"] = [None if math.isnan(a) else a for a in res["per_class_acc"]]
        Path(args.results_file).write_text(json.dumps(res, indent=2, allow_nan=False))
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
