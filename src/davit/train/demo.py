"""`davit demo` (what `make demo` runs): a small DaViT trained from scratch on the 60k Fashion-MNIST training
images on the CPU with the ``fashion-mnist`` preset, evaluated on the official 10k test images.

By default the run fits a wall-clock budget (``--minutes``, 10): a few timed training steps decide how many
epochs fit, so a slow or busy machine trains fewer epochs instead of running for an hour. ``--epochs N``
trains a fixed schedule instead."""

from __future__ import annotations

import os
import time
from datetime import datetime

from .config import resolve_config

__all__ = ["run_demo", "pick_threads"]


def pick_threads() -> int:
    """All cores, unless the machine is already busy: with more runnable processes than cores, OpenMP
    threads that wait for each other at every op make 2 threads several times slower than 1."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return n
    return 1 if load >= n else n


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc), else 0; the demo's clock starts with the command."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def run_demo(
    output: str = "output/demo",
    epochs: int | None = None,
    data_dir: str | None = None,
    minutes: float = 10.0,
) -> int:
    from ..data import FASHION_MNIST_DIR

    t0 = time.time() - _process_age()
    root = data_dir or FASHION_MNIST_DIR
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}: install it with "
            "'sudo apt-get install dataset-fashion-mnist' (or pass --data-dir with the four IDX .gz files)"
        )
    threads = pick_threads()
    over = {
        "output": output,
        "experiment": f"fashion-mnist-{datetime.now().strftime('%Y%m%d-%H%M%S')}",
        "data_dir": data_dir,
        "device": "cpu",
        "threads": threads,
    }
    if epochs is not None:
        over["epochs"] = epochs
    else:
        # the budget is the whole command's wall time: what the process spent starting (importing torch: 6-8 s
        # here) is taken off, and ~20 s are kept for what runs after training: the flip evaluation (two passes
        # over the 10k test images, 6-12 s) and the attention sheets
        over["time_budget"] = minutes * 60 - _process_age() - 20
        if over["time_budget"] < 10:
            raise ValueError(
                f"--minutes {minutes:g} leaves {over['time_budget']:.0f} s to train once start-up "
                f"({_process_age():.0f} s) and the final evaluation (~20 s) are taken off: give at least 1"
            )
    cfg = resolve_config("fashion-mnist", None, over)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"davit demo: {cfg.model} on Fashion-MNIST, CPU, {threads} thread(s) (load average {load:.1f} on "
        f"{os.cpu_count()} cores)",
        flush=True,
    )
    from .trainer import train

    res = train(cfg)
    d = res["run_dir"]
    if res.get("stopped"):
        print(
            f"demo stopped before the end; continue it with: davit train --config {d}/config.yaml "
            f"--resume auto --experiment {os.path.basename(d)} --output {output}"
        )
        return 130
    flip = _flip_eval(d, cfg)
    sheets = _attention_sheets(d, cfg)
    wall = time.time() - t0  # the whole command, start-up and attention sheets included
    print()
    print(
        f"Fashion-MNIST test accuracy (official 10k test images): top-1 {res['top1']:.2f}%  "
        f"top-5 {res['top5']:.2f}%   [{cfg.model}, {res['epoch'] + 1} epochs, {wall / 60:.1f} min wall]"
    )
    print(
        f"with test-time flips (mean logits of each image and its mirror image): top-1 {flip['top1']:.2f}%  "
        f"top-5 {flip['top5']:.2f}%"
    )
    print(f"report:    {d}/report.md")
    print(f"pictures:  {d}/curves.png  {d}/confusion.png")
    print(f"weights:   {d}/model.safetensors   (davit predict IMG --checkpoint {d})")
    if sheets:
        print(f"attention: {len(sheets)} sheets in {os.path.dirname(sheets[0])}  (davit viz fashion-mnist:N "
              f"--checkpoint {d})")
    return 0


def _test_loader(cfg, batch: int | None = None):
    """The official test images as the run evaluated them: its uint8 dataset and evaluation batch transform
    (the pieces :func:`davit.train.setup.build_data` uses, without decoding the training set)."""
    from ..data import build_batch_transform, build_dataset, build_loader
    from .setup import resolve_data_params

    dp = resolve_data_params(cfg)
    ds = build_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, raw=True)
    bt = build_batch_transform(False, input_size=dp["img_size"], mean=dp["mean"], std=dp["std"])
    size = batch or cfg.validation_batch_size or cfg.batch_size
    return build_loader(ds, size, False, workers=0, batch_transform=bt)


def _flip_eval(run_dir: str, cfg) -> dict:
    """Top-1/5 of the trained model with test-time flips, also appended to the run's report.md; the
    single-view figures stay the run's result (metrics.jsonl, the printed top-1)."""
    import torch

    from .metrics import evaluate
    from .setup import model_from_metadata

    model, _ = model_from_metadata(os.path.join(run_dir, "model.safetensors"))
    res = evaluate(model, _test_loader(cfg), torch.device("cpu"), model.num_classes, flip=True)
    with open(os.path.join(run_dir, "report.md"), "a") as f:
        f.write(
            f"\nWith test-time flips (`davit eval {run_dir} --tta-flip`: the mean logits of each test "
            f"image and its mirror image): top-1 {res['top1']:.2f}%, top-5 {res['top5']:.2f}% on "
            f"{res['count']} images.\n"
        )
    return res


def _attention_sheets(run_dir: str, cfg, n: int = 4) -> list:
    """Window/channel attention and Grad-CAM sheets of the trained model for the first ``n`` test images."""
    from ..data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from ..viz.run import load_model, write_demo_sheets

    model, _ = load_model(None, os.path.join(run_dir, "model.safetensors"))
    x, y = next(iter(_test_loader(cfg, n)))  # (n, 1, 28, 28), the eval preprocessing
    labels = [int(t) for t in y]
    return write_demo_sheets(model, x, labels, FASHION_MNIST_CLASSES, os.path.join(run_dir, "viz"),
                             mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
