"""`davit list`, `davit info` (the variant table, parameters and measured GMACs) and `davit convert`."""

from __future__ import annotations

import argparse
import json
import os

import torch

from .cli import positive_int
from .flops import count_gmacs, count_params
from .models import create_model, list_models, model_info


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list model variants")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="parameters, GMACs and metadata of a variant")
    p.add_argument("model", help="variant name (see `davit list`)")
    p.add_argument("--img-size", type=positive_int, default=None, help="input side (default: the variant's)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "convert",
        help="convert a DaViT checkpoint (official/timm/Florence-2/transformers/mm*) to safetensors",
    )
    p.add_argument("src", help="checkpoint (.safetensors/.pth/.pt/.bin/.ckpt); layout auto-detected")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--model", default=None, help="verify against this variant and print the load report")
    p.add_argument(
        "--to", choices=("native", "timm", "official", "mm"), default="native", help="output key layout"
    )
    p.add_argument("--layout", default=None, help="force the source layout instead of detecting it")
    p.add_argument("--ema", action="store_true", help="take the EMA weights when the file holds both")
    p.add_argument("--force", action="store_true", help="write even if the weights do not fit --model")
    p.set_defaults(func=cmd_convert)


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


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights import (
        WeightsError,
        check_weights,
        from_native,
        guess_variants,
        infer_arch,
        load_state_dict,
        save_weights,
        to_native,
    )

    sd = load_state_dict(args.src, use_ema=args.ema)
    native, layout, ignored, unmapped = to_native(sd, args.layout)
    arch = infer_arch(native)
    print(f"{args.src}: layout {layout}, {len(native)} DaViT tensors, {len(ignored)} other keys ignored")
    if unmapped:
        print(f"  {len(unmapped)} keys under the tower with no known name: {unmapped[:5]}")
    guesses = guess_variants(native)
    print(
        f"  embed_dims {arch['embed_dims']}, depths {arch['depths']}, classes {arch['num_classes']}"
        f" -> {', '.join(guesses) if guesses else 'no registered variant'}"
    )
    if args.model:
        dense = any(k.startswith("out_norms.") for k in native)
        with torch.device("meta"):  # shapes only: checking a giant variant allocates nothing
            model = create_model(
                args.model,
                num_classes=arch["num_classes"],
                in_chans=arch["in_chans"] or 3,
                features_only=dense,
                out_norm=dense,
            )
        report = check_weights(model, sd, layout=args.layout)
        report.source = args.src
        print(report)
        if not report.ok and not args.force:
            raise WeightsError(
                f"{args.src} does not fit {args.model}; nothing written (--force writes anyway)"
            )
    named = args.to == "timm" and (layout.startswith("florence2") or (args.model or "").endswith("_fl"))
    out = from_native(native, args.to, named_blocks=named)
    meta = {"layout": args.to, "source_layout": layout, "source": os.path.basename(args.src)}
    if args.model or guesses:
        meta["model"] = args.model or guesses[0]
    path = save_weights(out, args.dst, metadata=meta)
    print(f"wrote {path}: {len(out)} tensors, layout {args.to}")
    return 0
