"""``davit data shards`` (convert a dataset to tar shards) and ``davit data check`` (decode every image of a
folder dataset once and report unreadable files and class problems before a long run)."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

__all__ = ["register"]


def _data_group(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The `data` command's subparsers, created unless another module (davit.tasks.cli) already did."""
    data = sub.choices.get("data")
    if data is None:
        data = sub.add_parser("data", help="datasets: build and inspect")
        data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    return next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))


def register(sub: argparse._SubParsersAction) -> None:
    group = _data_group(sub)
    p = group.add_parser("shards", help="write a folder or Fashion-MNIST split as webdataset tar shards")
    p.add_argument("--dataset", default="folder", choices=("folder", "fashion-mnist"))
    p.add_argument("--data-dir", default=None, help="ROOT with train/CLASS/* (folder) or the IDX files")
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="empty output folder for shard-NNNNNN.tar + index.json")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (default PIL's 89M)")
    p.set_defaults(func=cmd_shards)

    p = group.add_parser("check", help="decode every image of a folder dataset; report bad files and classes")
    p.add_argument("--data-dir", required=True, help="ROOT with train/CLASS/* and val/CLASS/*")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_check)


def _pixel_kw(args) -> dict:
    return {} if args.max_pixels is None else {"max_pixels": args.max_pixels}


def cmd_shards(args) -> int:
    from . import build_dataset, write_shards

    ds = build_dataset(args.dataset, args.data_dir, args.split, **_pixel_kw(args))
    index = write_shards(ds, args.out, shard_size=args.shard_size)
    print(
        f"wrote {index['num_samples']} samples of {len(index['classes'])} classes in "
        f"{len(index['shards'])} shards to {args.out}"
    )
    if index["skipped"]:
        print(f"{len(index['skipped'])} unreadable files left out:")
        for path, reason in index["skipped"]:
            print(f"  {path}: {reason}")
    return 0


def _size(img) -> torch.Tensor:
    return torch.tensor(img.size)


def cmd_check(args) -> int:
    from . import build_loader, check_class_match
    from .folder import ImageFolder

    report, datasets, ok = {}, [], True
    for split in args.splits:
        ds = ImageFolder(args.data_dir, split, transform=_size, **_pixel_kw(args))
        datasets.append(ds)
        loader = build_loader(ds, 64, is_training=False, workers=args.workers)
        n, sizes = 0, Counter()
        for x, _ in loader:
            n += len(x)
            sizes.update(tuple(s) for s in x.tolist())
        per_class = Counter(ds.classes[k] for k in ds.targets)
        report[split] = {
            "root": ds.root,
            "files": len(ds),
            "readable": n,
            "classes": len(ds.classes),
            "min_per_class": min(per_class.values()),
            "max_per_class": max(per_class.values()),
            "common_sizes": [[w, h, c] for (w, h), c in sizes.most_common(3)],
            "bad": [[b.path, b.reason] for b in loader.bad],
        }
        ok &= not loader.bad
    try:
        for other in datasets[1:]:
            check_class_match(datasets[0], other)
        report["classes_match"] = True
    except ValueError as e:
        report["classes_match"], ok = str(e), False
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for split in args.splits:
            r = report[split]
            print(
                f"{split}: {r['readable']}/{r['files']} readable, {r['classes']} classes "
                f"({r['min_per_class']}-{r['max_per_class']} files each), common sizes "
                + ", ".join(f"{w}x{h} ({c})" for w, h, c in r["common_sizes"])
            )
            for path, reason in r["bad"]:
                print(f"  unreadable: {path}: {reason}")
        print("classes match" if report["classes_match"] is True else report["classes_match"])
    return 0 if ok else 1
