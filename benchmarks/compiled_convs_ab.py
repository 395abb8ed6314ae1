"""Compiled CPU steps with the convolutions as opaque ops (the default) against plain convolutions.

    .venv/bin/python benchmarks/compiled_convs_ab.py                  # davit_tiny training, batch 8, 9 rounds
    .venv/bin/python benchmarks/compiled_convs_ab.py --mode infer -b 16 --rounds 7

Four steps in one process, each compiled once (`torch.compile` with inductor's defaults, batch axis
dynamic, ours with ``fullgraph=True``): ours with ``davit::conv2d`` (``davit.layers.fused.conv``, the
default), ours with ``set_opaque_convs(False)`` (plain ``aten.convolution``, so inductor's layout
optimisation is on), ours eager and timm's compiled model with identical weights. Each round runs three steps
of each in turn (A, B, C, D, A, ...); the summary is the median over rounds of each one's per-round median,
and its speed relative to timm's compiled step. A training step is `davit bench`'s: zero-grad, forward,
cross-entropy, backward, fused AdamW. Without timm installed the timm column is left out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from davit import create_model
from davit.bench import _make_step, load_timm_weights, timm_counterpart
from davit.layers import fused


def _with_convs(step: Callable[[], object], opaque: bool) -> Callable[[], object]:
    # the setting is read while dynamo traces, and its value guards the graph: each step runs under its own
    def run() -> object:
        previous = fused.set_opaque_convs(opaque)
        try:
            return step()
        finally:
            fused.set_opaque_convs(previous)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="davit_tiny")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    torch._dynamo.mark_dynamic(x, 0)
    names = ["ours compiled, opaque convs", "ours compiled, plain convs", "ours eager", "timm compiled"]
    steps: dict[str, Callable[[], object]] = {}
    for name in names:
        model = create_model(args.model)
        net = model
        if name.startswith("timm"):
            try:
                net = timm_counterpart(args.model, 1000, 3)
            except RuntimeError as e:  # timm is not installed
                print(f"{e}: its column is left out")
                continue
            load_timm_weights(model, net)
        net.train(args.mode == "train")
        fn = net if name == "ours eager" else torch.compile(net, fullgraph=name.startswith("ours"))
        step, _ = _make_step(fn, x, args.mode, torch.float32, torch.device("cpu"), net)
        step = _with_convs(step, opaque="plain" not in name)
        t = time.perf_counter()
        step()
        print(f"{name}: first call {time.perf_counter() - t:.0f} s", flush=True)
        step()
        steps[name] = step

    per_round: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t)
            per_round[name].append(statistics.median(ts))
        line = ", ".join(f"{n} {v[-1] * 1e3:.0f} ms" for n, v in per_round.items())
        print(f"round {r}: {line}", flush=True)

    med = {n: statistics.median(v) for n, v in per_round.items()}
    base = med.get("timm compiled")
    head = f"{args.model} {args.mode} batch {args.batch_size}, {args.img_size} px"
    print(f"\n{head}, median of {args.rounds} rounds:")
    for name, m in med.items():
        rel = f", {base / m:.3f}x timm compiled" if base else ""
        print(f"  {name:28s} {m * 1e3:7.0f} ms{rel}")


if __name__ == "__main__":
    main()
