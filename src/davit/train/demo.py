"""`davit demo` (what `make demo` runs): a small DaViT trained from scratch on the 60k Fashion-MNIST training
images on the CPU with the ``fashion-mnist`` preset, evaluated on the official 10k test images."""

from __future__ import annotations

import os
import time
from datetime import datetime

import torch

from .config import resolve_config

__all__ = ["run_demo"]


def run_demo(output: str = "output/demo", epochs: int | None = None, data_dir: str | None = None) -> int:
    from ..data import FASHION_MNIST_DIR

    root = data_dir or FASHION_MNIST_DIR
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}: install it with "
            "'sudo apt-get install dataset-fashion-mnist' "
            "(or pass --data-dir with the four IDX .gz files)"
        )
    over = {
        "output": output,
        "experiment": f"fashion-mnist-{datetime.now().strftime('%Y%m%d-%H%M%S')}",
        "data_dir": data_dir,
        "device": "cpu",
    }
    if epochs is not None:
        over["epochs"] = epochs
    cfg = resolve_config("fashion-mnist", None, over)
    torch.set_num_threads(os.cpu_count() or 1)
    from .trainer import train

    t0 = time.time()
    res = train(cfg)
    wall = time.time() - t0
    d = res["run_dir"]
    print()
    print(
        f"Fashion-MNIST test accuracy (official 10k test images): top-1 {res['top1']:.2f}%  "
        f"top-5 {res['top5']:.2f}%   [{cfg.model}, {cfg.epochs} epochs, {wall / 60:.1f} min wall]"
    )
    print(f"report:    {d}/report.md")
    print(f"pictures:  {d}/curves.png  {d}/confusion.png")
    print(f"weights:   {d}/model.safetensors   (davit predict IMG --checkpoint {d})")
    return 0
