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

from collections.abc import Callable

import torch
from ab_rounds import build, compile_caches_off, interleaved_medians, parser, print_summary, under, warm_up

from davit.bench import _make_step
from davit.layers import fused


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    torch._dynamo.mark_dynamic(x, 0)
    compile_caches_off()  # each model compiles its own graphs
    names = ["ours compiled, opaque convs", "ours compiled, plain convs", "ours eager", "timm compiled"]
    steps: dict[str, Callable[[], object]] = {}
    for name in names:
        net = build(args.model, timm=name.startswith("timm"))
        if net is None:
            continue
        net.train(args.mode == "train")
        fn = net if name == "ours eager" else torch.compile(net, fullgraph=name.startswith("ours"))
        step, _ = _make_step(fn, x, args.mode, torch.float32, torch.device("cpu"), net)
        step = under(fused.set_opaque_convs, "plain" not in name, step)
        warm_up(name, step)
        steps[name] = step

    med = interleaved_medians(steps, args.rounds)
    head = f"{args.model} {args.mode} batch {args.batch_size}, {args.img_size} px"
    print_summary(head, med, "timm compiled", args.rounds)


if __name__ == "__main__":
    main()
