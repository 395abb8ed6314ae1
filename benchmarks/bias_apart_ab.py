"""Compiled CPU training with linears' biases added apart (the default) against ``F.linear``'s addmm.

    .venv/bin/python benchmarks/bias_apart_ab.py                  # davit_tiny training, batch 8, 9 rounds
    .venv/bin/python benchmarks/bias_apart_ab.py --rounds 21

Three steps in one process, each compiled once (`torch.compile` with inductor's defaults, batch axis
dynamic, ours with ``fullgraph=True``): ours with the biases apart (``davit.layers.fused.bias_apart``: the
add joins inductor's kernel for the consumer), ours with ``set_bias_apart(False)`` (aten's addmm, which
writes the bias over its whole output before the product) and timm's compiled model with identical weights.
Each round runs three steps of each in turn, the order turning by one each round; the summary is the median
over rounds of each one's per-round median, relative to timm's, and the median of the per-round ratios
apart / addmm. A step is `davit bench`'s: zero-grad, forward, cross-entropy, backward, fused AdamW. Without
timm installed its column is left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ab_rounds import (
    build,
    compile_caches_off,
    interleaved_medians,
    paired,
    parser,
    print_summary,
    under,
    warm_up,
)

from davit.bench import _make_step
from davit.layers import fused


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    torch._dynamo.mark_dynamic(x, 0)
    compile_caches_off()  # each model compiles its own graphs
    names = ["ours, bias apart", "ours, addmm", "timm compiled"]
    steps: dict[str, Callable[[], object]] = {}
    for name in names:
        net = build(args.model, timm=name.startswith("timm"))
        if net is None:
            continue
        net.train(args.mode == "train")
        fn = torch.compile(net, fullgraph=name.startswith("ours"))
        step, _ = _make_step(fn, x, args.mode, torch.float32, torch.device("cpu"), net)
        step = under(fused.set_bias_apart, name == "ours, bias apart", step)
        warm_up(name, step)
        steps[name] = step

    per_round: dict[str, list[float]] = {}
    med = interleaved_medians(steps, args.rounds, per_round=per_round)
    head = f"{args.model} {args.mode} batch {args.batch_size}, {args.img_size} px, compiled"
    print_summary(head, med, "timm compiled" if "timm compiled" in med else "ours, addmm", args.rounds)
    print(f"  per-round addmm / apart: {paired(per_round, 'ours, bias apart', 'ours, addmm')}")


if __name__ == "__main__":
    main()
