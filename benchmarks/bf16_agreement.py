"""How often a trained model's bf16 top-1 prediction equals its fp32 one, on the real images of its run.

usage: python benchmarks/bf16_agreement.py RUN_DIR [--device cpu|cuda] [--batch 512]

RUN_DIR is a `davit train` / `davit demo` run folder (its model.safetensors and config.yaml); the images are
its validation split, preprocessed as the run evaluated them. The fp32 pass is the plain forward; the bf16
pass runs the same weights under bf16 autocast (the trainer's --amp). Prints and returns the agreement of the
top-1 predictions and each precision's top-1 accuracy (issue 4's numerics target: >= 99 % agreement).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from davit.data import build_batch_transform, build_dataset, build_loader
from davit.train.config import resolve_config
from davit.train.setup import model_from_metadata, resolve_data_params


def agreement(run_dir: str, device: str = "cpu", batch: int = 512) -> dict:
    cfg = resolve_config(None, os.path.join(run_dir, "config.yaml"))
    model, _ = model_from_metadata(os.path.join(run_dir, "model.safetensors"))
    model = model.to(device).eval()
    dp = resolve_data_params(cfg)
    ds = build_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, raw=True)
    bt = build_batch_transform(False, input_size=dp["img_size"], mean=dp["mean"], std=dp["std"])
    same = n = right32 = right16 = 0
    with torch.inference_mode():
        for x, y in build_loader(ds, batch, False, workers=0, batch_transform=bt):
            x, y = x.to(device), y.to(device)
            p32 = model(x).argmax(1)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                p16 = model(x).argmax(1)
            same += int((p32 == p16).sum())
            right32 += int((p32 == y).sum())
            right16 += int((p16 == y).sum())
            n += len(y)
    return dict(images=n, agreement=100 * same / n, top1_fp32=100 * right32 / n, top1_bf16=100 * right16 / n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=512)
    a = p.parse_args(argv)
    r = agreement(a.run_dir, a.device, a.batch)
    print(
        f"{r['images']} images: bf16 top-1 = fp32 top-1 on {r['agreement']:.2f} %; top-1 fp32 "
        f"{r['top1_fp32']:.2f} %, bf16 {r['top1_bf16']:.2f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
