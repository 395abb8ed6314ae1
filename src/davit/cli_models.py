"""`davit list` and `davit info`: the variant table, parameters and measured GMACs."""

from __future__ import annotations

import argparse
import json

import torch

from .flops import count_gmacs, count_params
from .models import create_model, list_models, model_info


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list model variants")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="parameters, GMACs and metadata of a variant")
    p.add_argument("model", help="variant name (see `davit list`)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the variant's)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def cmd_list(args: argparse.Namespace) -> int:
    for n in list_models(args.pattern):
        print(n)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    img = args.img_size or info["input_size"][1]
    with torch.device("meta"):  # the giant variant has 1.4B parameters: never allocate them for counting
        model = create_model(args.model, num_classes=args.num_classes)
    out = {
        "model": args.model,
        "params": count_params(model),
        "img_size": img,
        "gmacs": round(count_gmacs(model, img), 3),
        "arch": info["arch"],
        "input_size": info["input_size"],
        "crop_pct": info["crop_pct"],
        "interpolation": info["interpolation"],
        "mean": info["mean"],
        "std": info["std"],
        "paper_top1": info["paper_top1"],
        "paper_params": info["num_params"],
        "paper_gmacs": info["gmacs"],
        "hf_hub_id": info["hf_hub_id"],
    }
    if args.json:
        print(json.dumps(out, indent=2, default=list))
    else:
        w = max(len(k) for k in out)
        for k, v in out.items():
            print(f"{k:<{w}}  {v}")
    return 0
