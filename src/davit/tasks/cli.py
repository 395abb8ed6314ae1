"""`davit detect ...`, `davit segment ...` and `davit data scenes`.

davit data scenes --out DIR                       build the Fashion-MNIST scene dataset
davit detect train --preset coco-maskrcnn-1x --data DIR --out RUN   (torchrun for DDP)
davit detect eval RUN [--data DIR]                 pycocotools box/mask AP of a run on its val split
davit detect predict RUN IMAGES... --out DIR       PNGs with boxes, masks and labels drawn
davit detect demo                                  scenes -> CPU training -> held-out evaluation
(the same four for `davit segment`, with mIoU and colour overlays)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

__all__ = ["register", "register_data_scenes"]

DEMO_SCENES = dict(num_train=1500, num_val=150, size=128, items=(2, 4), item_frac=(0.2, 0.45), seed=0)


def register(sub: argparse._SubParsersAction) -> None:
    for task, what in (
        ("detect", "Mask R-CNN detection + instance segmentation"),
        ("segment", "UperNet semantic segmentation"),
    ):
        p = sub.add_parser(task, help=f"{what} on a DaViT backbone")
        s = p.add_subparsers(dest="action", metavar="ACTION", required=True)
        q = s.add_parser("train", help="train (presets, config file, --set overrides; torchrun for DDP)")
        _config_args(q)
        q.add_argument("--out", required=True, help="run folder (resumes from its newest valid checkpoint)")
        q.add_argument(
            "--no-resume", action="store_true", help="start over even if the folder has checkpoints"
        )
        q.set_defaults(func=cmd_train, task=task)
        q = s.add_parser("eval", help="evaluate a trained run on a validation split")
        q.add_argument("run", help="run folder written by train")
        q.add_argument("--data", help="scenes-style data root (default: the run's)")
        q.add_argument(
            "--set",
            nargs="*",
            default=[],
            metavar="KEY=VALUE",
            help="test-time overrides, e.g. test_mode=slide test_flip=true val_ann=...",
        )
        q.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda")
        q.set_defaults(func=cmd_eval, task=task)
        q = s.add_parser("predict", help="draw predictions on images into PNGs")
        q.add_argument("run", help="run folder written by train")
        q.add_argument("images", nargs="+", help="image files or folders")
        q.add_argument("--out", required=True, help="output folder for the PNGs")
        q.add_argument("--score", type=float, default=0.5, help="detection score threshold")
        q.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda")
        q.set_defaults(func=cmd_predict, task=task)
        q = s.add_parser("demo", help="build scenes, train on CPU, evaluate on held-out scenes")
        q.add_argument("--out", default=f"runs/{task}-demo", help="run folder")
        q.add_argument("--data", default="runs/scenes", help="scene folder (built if missing)")
        q.add_argument(
            "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the demo preset"
        )
        q.set_defaults(func=cmd_demo, task=task)
    register_data_scenes(sub)


def register_data_scenes(sub: argparse._SubParsersAction) -> None:
    """Adds `scenes` under a `data` group, creating the group unless another module already did."""
    data = sub.choices.get("data") if hasattr(sub, "choices") else None
    if data is None:
        data = sub.add_parser("data", help="datasets: build and inspect")
        data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    group = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))
    p = group.add_parser("scenes", help="build Fashion-MNIST scenes (COCO instances JSON + label PNGs)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=300)
    p.add_argument("--size", type=int, default=256, help="canvas side in pixels")
    p.add_argument("--items", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"))
    p.add_argument(
        "--item-frac",
        type=float,
        nargs=2,
        default=(0.15, 0.45),
        metavar=("MIN", "MAX"),
        help="item side as a fraction of the canvas",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fmnist-root", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.set_defaults(func=cmd_scenes)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="coco-maskrcnn-1x, coco-maskrcnn-3x, ade20k-upernet-160k, scenes-*-demo")
    p.add_argument("--config", help="YAML/JSON file of options (over the preset)")
    p.add_argument("--data", help="scenes-style data root (images/, labels/, annotations/)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="options over preset and file")
    p.add_argument("--progress", default="auto", choices=("auto", "rich", "plain", "none"))


def cmd_scenes(args: argparse.Namespace) -> int:
    from .scenes import FASHION_MNIST_ROOT, build_scenes

    t0 = time.time()
    meta = build_scenes(
        args.out,
        args.num_train,
        args.num_val,
        args.size,
        tuple(args.items),
        tuple(args.item_frac),
        args.seed,
        args.fmnist_root or FASHION_MNIST_ROOT,
    )
    print(
        f"wrote {meta['num_train']} train + {meta['num_val']} val scenes ({args.size} px) to {args.out} "
        f"in {time.time() - t0:.1f} s"
    )
    return 0


def _resolve(task: str, args: argparse.Namespace, preset: str | None = None):
    from .config import parse_set, resolve_task_config

    over = parse_set(args.set)
    if getattr(args, "data", None):
        over["data"] = args.data
    return resolve_task_config(
        task, preset or getattr(args, "preset", None), getattr(args, "config", None), over
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import train

    cfg = _resolve(args.task, args)
    scores = train(cfg, args.out, resume=not args.no_resume, progress=args.progress)
    if scores.get("stopped"):
        return 130  # interrupted by a signal after saving; the same command resumes
    if scores:  # rank 0 evaluates; the other ranks of a torchrun job return no scores
        _print_scores(args.task, scores)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..train.distributed import pick_device
    from .config import parse_set
    from .engine import build_datasets, evaluate, load_run

    device = pick_device(args.device, 0)
    if device.type == "cpu":  # large activations reused, not re-mapped per batch (davit.alloc)
        from ..alloc import tune_malloc

        print(tune_malloc())
    over = {**parse_set(args.set), **({"data": args.data} if args.data else {})}
    model, cfg = load_run(args.run, device, over, task=args.task)  # the overrides reach the model too
    ds = build_datasets(cfg, ("val",))["val"]
    scores = evaluate(model, ds, cfg, device, progress="auto")
    _print_scores(args.task, scores)
    return 0


def _print_scores(task: str, scores: dict) -> None:
    from .coco import COCO_METRICS, format_metric

    if task == "detect":  # one line per IoU type: all six COCO numbers, n/a where pycocotools has none
        rows = [[f"{p}_{m}" for m in COCO_METRICS] for p in ("box", "mask")]
    else:
        rows = [["mIoU", "aAcc", "mAcc"]]
    lines = ["  ".join(f"{k} {format_metric(scores[k])}" for k in row if k in scores) for row in rows]
    lines = [ln for ln in lines if ln] or [""]
    lines[-1] += f"  ({scores.get('infer_img_per_s', 0):.1f} img/s inference)"
    print("\n".join(lines))
    if task == "segment" and "IoU" in scores:
        print("per-class IoU: " + json.dumps([round(v, 4) for v in scores["IoU"]]))


def _image_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(
                f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp")
            )
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"no images found in {paths}")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    """Draw predictions into ``--out``. Unreadable files are named on stderr with the reason and skipped; the
    rest are still written. Exit 1 when any file was skipped (as the classification `davit predict` does, so
    a script notices a partial result), else 0."""
    from ..train.distributed import pick_device
    from .engine import load_run
    from .predict import predict_files

    model, cfg = load_run(args.run, pick_device(args.device, 0), task=args.task)
    written, skipped = predict_files(model, cfg, _image_files(args.images), args.out, args.score)
    for bad in skipped:
        print(f"{bad.path}: skipped, cannot read: {bad.reason}", file=sys.stderr)
    print(
        f"wrote {len(written)} PNGs to {args.out}"
        + (f"; skipped {len(skipped)} unreadable file{'s' * (len(skipped) != 1)}" if skipped else "")
    )
    return 1 if skipped else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .engine import load_run, train
    from .predict import predict_files
    from .scenes import build_scenes

    data = Path(args.data)
    if not (data / "meta.json").is_file():
        print(f"building scenes in {data} ...", flush=True)
        build_scenes(data, **DEMO_SCENES)
    args.preset = f"scenes-{'maskrcnn' if args.task == 'detect' else 'upernet'}-demo"
    cfg = _resolve(args.task, args, args.preset)
    cfg.data = str(data)
    t0 = time.time()
    scores = train(cfg, args.out, resume=False, progress="auto")
    if scores.get("stopped"):
        # the demo itself always starts over; `train` on the same folder resumes the saved iteration
        sets = shlex.join(args.set)
        print(
            f"(a demo starts over; to continue this one: davit {args.task} train --preset {args.preset} "
            f"--data {data} --out {args.out}" + (f" --set {sets}" if sets else "") + ")"
        )
        return 130
    print(
        f"demo trained and evaluated in {(time.time() - t0) / 60:.1f} min"
    )
    _print_scores(args.task, scores)
    model, cfg = load_run(args.out)
    files = sorted((data / "images" / "val").iterdir())[:8]
    predict_files(model, cfg, files, Path(args.out) / "predictions", 0.5)
    print(f"report: {Path(args.out) / 'report.md'}; predictions: {Path(args.out) / 'predictions'}")
    return 0


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main())
