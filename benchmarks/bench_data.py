"""Input-pipeline throughput (images/s through the training loader, no model), to see whether data loading can
keep up with training on a small CPU. Pin it to the cores you want to model, e.g.
``taskset -c 0,1 python benchmarks/bench_data.py`` for the 2-core demo machine.

Cases: Fashion-MNIST with per-image PIL transforms (simple recipe) vs the batched uint8 augmentation, with 0
and 2 workers; and the ImageNet train transform (RandomResizedCrop 224 + RandAugment + erasing) per image.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from davit.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    build_batch_transform,
    build_dataset,
    build_loader,
    build_transform,
)


def loader_rate(ds, workers: int, batch_size: int, max_batches: int, **kw) -> tuple[float, float]:
    loader = build_loader(ds, batch_size, True, workers=workers, **kw)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)  # worker start-up is a one-off cost, not throughput
    t, c, n = time.perf_counter(), time.process_time(), 0
    for i, (x, _) in enumerate(it):
        n += len(x)
        if i + 1 >= max_batches:
            break
    # wall rate, and for workers=0 the rate per CPU-second of this process (stable on a busy machine)
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {}
    simple = build_transform(
        True, 28, in_chans=1, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, simple=True
    )
    pil = build_dataset("fashion-mnist", None, "train", transform=simple)
    raw = build_dataset("fashion-mnist", None, "train", raw=True)
    bt = build_batch_transform(True, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, reprob=0.25)
    for w in (0, 2):
        wall, cpu = loader_rate(pil, w, 256, args.batches)
        out[f"fmnist_pil_simple_w{w}"] = wall
        if w == 0:
            out["fmnist_pil_simple_per_cpu_s"] = cpu
        wall, cpu = loader_rate(raw, w, 256, args.batches, batch_transform=bt)
        out[f"fmnist_batched_w{w}"] = wall
        if w == 0:
            out["fmnist_batched_per_cpu_s"] = cpu
    tf = build_transform(True, 224, aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), np.uint8))
    c = time.process_time()
    for _ in range(100):
        tf(img)
    out["imagenet_train_transform_per_cpu_s"] = 100 / (time.process_time() - c)
    print(json.dumps({k: round(v, 1) for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
