"""Ours with davit's native CPU kernels (the default) against ours with torch's ops only, and timm.

    .venv/bin/python benchmarks/native_ab.py                       # eager training, davit_tiny b8, 9 rounds
    .venv/bin/python benchmarks/native_ab.py --compile --rounds 15
    .venv/bin/python benchmarks/native_ab.py --mode infer -b 16

Three steps in one process: ours with the kernels (``davit.layers.native``: window attention and position
encodings forward and backward, inference layer norms), ours with ``set_native_kernels(False)`` and timm's
model with identical weights (with ``--compile`` each compiled once, inductor's defaults, batch axis
dynamic, ours with ``fullgraph=True``; ours without kernels is traced with them off, as a distinct backend,
so that it holds torch's ops rather than reusing the first graph). Each round runs three calls of each in
turn, the order turning by one each round; the summary is the median over rounds of each one's per-round
median relative to timm's, and the median and quartiles of the per-round ratios (a slow spell of the
machine hits both steps of a round alike). A training step is `davit bench`'s: zero-grad, forward,
cross-entropy, backward, fused AdamW. Without timm installed its column is left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ab_rounds import build, interleaved_medians, paired, parser, print_summary, warm_up

from davit.bench import _make_step
from davit.layers import native


def _with_kernels(step: Callable[[], object], on: bool | None) -> Callable[[], object]:
    # eager code and compiled inference's opaque ops read the setting when they run, compiled training when
    # it is traced: each step runs under its own
    def run() -> object:
        native.set_native_kernels(on)
        try:
            return step()
        finally:
            native.set_native_kernels(None)

    return run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--compile", action="store_true", help="compile each model (torch.compile, inductor)")
    args = p.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    if args.compile:
        torch._dynamo.mark_dynamic(x, 0)
    steps: dict[str, Callable[[], object]] = {}
    for name, on in (("ours, native kernels", None), ("ours, torch's ops", False), ("timm", None)):
        net = build(args.model, timm=name == "timm")
        if net is None:
            continue
        net.train(args.mode == "train")
        fn: Callable = net
        if args.compile:
            # an inductor option at its default value makes a distinct backend (see the docstring)
            options = {"freezing": False} if on is False else {}
            fn = torch.compile(net, fullgraph=name != "timm", options=options)
        step, _ = _make_step(fn, x, args.mode, torch.float32, torch.device("cpu"), net)
        step = _with_kernels(step, on)
        warm_up(name, step)
        steps[name] = step

    per_round: dict[str, list[float]] = {}
    med = interleaved_medians(steps, args.rounds, per_round=per_round)
    how = "compiled" if args.compile else "eager"
    head = f"{args.model} {args.mode} {how} batch {args.batch_size}, {args.img_size} px"
    print_summary(head, med, "timm" if "timm" in med else "ours, torch's ops", args.rounds)
    mine, plain = "ours, native kernels", "ours, torch's ops"
    print(f"  per-round torch's ops / native: {paired(per_round, mine, plain)}")
    if "timm" in med:
        print(f"  per-round timm / native:        {paired(per_round, mine, 'timm')}")


if __name__ == "__main__":
    main()
