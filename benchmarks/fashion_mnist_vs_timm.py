"""Fashion-MNIST demo, side by side: our DaViT vs timm's DaVit of the same shape, same recipe, same budget.

    .venv/bin/python benchmarks/fashion_mnist_vs_timm.py             # 10-minute budget each (as davit demo)
    .venv/bin/python benchmarks/fashion_mnist_vs_timm.py --epochs 3  # the same fixed schedule for both

Both runs start from the same initial weights and go through the same trainer (`davit.train`), data
pipeline, seed and ``fashion-mnist`` preset; only the network code differs. timm's model:
``timm.models.davit.DaVit`` with the preset's depths/dims/heads/window.
The preset's stem stride 4 is timm's own. For a stride-2 stem (our small variants' default, 28 px -> 14x14
tokens) timm's ``Stem.__init__`` asserts stride 4, so after building it we replace its conv by the same
Conv2d(k7, s2, p3) and set ``stem.stride = (2, 2)`` (its forward pads with that stride): the two networks are
then the same architecture, parameter for parameter (checked below by parameter names and shapes).
The preset's two-conv stem (``conv_stem``, not in the paper and not in timm) is given to timm's model as the
same module, returning NCHW as timm's own stem does: the stems are equal, the trunks are the two codes.

The runs are sequential on a shared CPU: compare accuracies; compare times only with the load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime

import torch
from torch import nn

from davit.train import trainer as trainer_mod
from davit.train.config import resolve_config
from davit.train.demo import pick_threads


def timm_twin(ours: nn.Module, num_classes: int, in_chans: int, drop_path: float) -> nn.Module:
    from timm.models.davit import DaVit

    from davit.models import ConvStem

    class NCHWConvStem(ConvStem):  # timm's stages take NCHW maps from the stem
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).permute(0, 3, 1, 2)

    conv_stem = isinstance(ours.stem, ConvStem)
    stride = ours.stem.stride if conv_stem else ours.stem.conv.stride[0]
    m = DaVit(
        in_chans=in_chans,
        num_classes=num_classes,
        depths=ours.depths,
        embed_dims=ours.embed_dims,
        num_heads=tuple(s.blocks[0][0].attn.num_heads for s in ours.stages),
        window_size=ours.window_size,
        drop_path_rate=drop_path,
    )
    if conv_stem:
        m.stem = NCHWConvStem(in_chans, ours.embed_dims[0], stride)
    elif stride != 4:
        m.stem.conv = nn.Conv2d(in_chans, ours.embed_dims[0], kernel_size=7, stride=stride, padding=3)
        m.stem.stride = (stride, stride)
    a = {n: p.shape for n, p in ours.named_parameters()}
    b = {n: p.shape for n, p in m.named_parameters()}
    if a != b:
        raise RuntimeError(f"timm twin differs: {sorted(set(a) ^ set(b))[:5]}")
    return m


def run(kind: str, epochs: int | None, minutes: float, output: str, steps: int | None = None) -> dict:
    over = {
        "output": output,
        "experiment": f"{kind}-{datetime.now():%Y%m%d-%H%M%S}",
        "device": "cpu",
        "threads": pick_threads(),
    }
    if steps is not None:  # the same number of updates for both: a fair accuracy comparison on a busy machine
        over.update(epochs=1, max_epoch_steps=steps)
    elif epochs is None:
        over["time_budget"] = minutes * 60 - 20
    else:
        over["epochs"] = epochs
    cfg = resolve_config("fashion-mnist", None, over)
    real = trainer_mod.build_model
    if kind == "timm":

        def build(cfg_, num_classes, in_chans, verbose=True):
            torch.manual_seed(cfg_.seed)
            ours = real(cfg_, num_classes, in_chans, verbose=False)  # with the preset's model_kwargs
            twin = timm_twin(ours, num_classes, in_chans, cfg_.drop_path or 0.0)
            twin.load_state_dict(
                ours.state_dict()
            )  # the same initial weights: only the implementation differs
            return twin

        trainer_mod.build_model = build
    load0 = os.getloadavg()[0]
    t0 = time.time()
    try:
        res = trainer_mod.train(cfg)
    finally:
        trainer_mod.build_model = real
    return {
        "model": kind,
        "top1": res["top1"],
        "top5": res["top5"],
        "epochs": res["epoch"] + 1,
        "wall_s": round(time.time() - t0, 1),
        "threads": cfg.threads,
        "load_start": load0,
        "load_end": os.getloadavg()[0],
        "run_dir": res["run_dir"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="fixed schedule for both (default: time budget)")
    p.add_argument("--minutes", type=float, default=10.0, help="budget per model when --epochs is not given")
    p.add_argument("--steps", type=int, default=None, help="train both for exactly N steps of one epoch")
    p.add_argument("--output", default="output/bench_fmnist")
    p.add_argument("--only", choices=["ours", "timm"], default=None)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    rows = [run(k, a.epochs, a.minutes, a.output, a.steps) for k in ("ours", "timm") if a.only in (None, k)]
    print("\nmodel  top-1   top-5   epochs  wall      threads  load (start/end)")
    for r in rows:
        print(
            f"{r['model']:<6} {r['top1']:6.2f}  {r['top5']:6.2f}  {r['epochs']:>6}  {r['wall_s']:7.1f}s  "
            f"{r['threads']:>7}  {r['load_start']:.1f}/{r['load_end']:.1f}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"date": datetime.now().isoformat(timespec="seconds"), "argv": sys.argv, "rows": rows},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
