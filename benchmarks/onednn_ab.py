"""Ours with its CPU fp32 linears in oneDNN against ours with ``F.linear`` (MKL), and timm.

    .venv/bin/python benchmarks/onednn_ab.py                      # eager training, davit_tiny b8, 9 rounds
    .venv/bin/python benchmarks/onednn_ab.py --compile            # the same steps compiled
    .venv/bin/python benchmarks/onednn_ab.py --mode infer -b 16 --compile

Decides :func:`davit.layers.fused.default_onednn_training` and
:func:`davit.layers.fused.default_onednn_compiled_inference` on a new CPU: three steps in one process, ours
with both settings on, ours with both off (``set_onednn_training``, ``set_onednn_compiled_inference``) and
timm's model with identical weights (with ``--compile`` each compiled once, inductor's defaults, batch axis
dynamic, ours with ``fullgraph=True``). Each round runs three calls of each in turn (A, B, C, A, ...); the
summary is the median over rounds of each one's per-round median, and its speed relative to timm's. A
training step is `davit bench`'s: zero-grad, forward, cross-entropy, backward, fused AdamW. Eager inference
does not depend on these two settings, so ``--mode infer`` needs ``--compile``; the GEMMs inside compiled
inference's opaque ops follow a third, :func:`davit.layers.fused.default_inference_onednn_gemms` (MKL's on
Intel AVX-512 CPUs), which this script leaves as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ab_rounds import build, compile_caches_off, interleaved_medians, parser, print_summary, warm_up

from davit.bench import _make_step
from davit.layers import fused


def _with_onednn(step: Callable[[], object], enable: bool) -> Callable[[], object]:
    # the settings are read while dynamo traces and guard the graph, and read on every eager call
    def run() -> object:
        previous = fused.set_onednn_training(enable), fused.set_onednn_compiled_inference(enable)
        try:
            return step()
        finally:
            fused.set_onednn_training(previous[0])
            fused.set_onednn_compiled_inference(previous[1])

    return run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    if args.mode == "infer" and not args.compile:
        p.error("eager inference does not use these settings: add --compile")

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    if args.compile:
        torch._dynamo.mark_dynamic(x, 0)
        compile_caches_off()  # each model compiles its own graphs
    names = ["ours oneDNN", "ours F.linear", "timm"]
    steps: dict[str, Callable[[], object]] = {}
    for name in names:
        net = build(args.model, timm=name == "timm")
        if net is None:
            continue
        net.train(args.mode == "train")
        fn = torch.compile(net, fullgraph=name != "timm") if args.compile else net
        step, _ = _make_step(fn, x, args.mode, torch.float32, torch.device("cpu"), net)
        if name != "timm":
            step = _with_onednn(step, enable=name == "ours oneDNN")
        warm_up(name, step)
        steps[name] = step

    med = interleaved_medians(steps, args.rounds)
    how = "compiled" if args.compile else "eager"
    head = f"{args.model} {args.mode} {how}, batch {args.batch_size}, {args.img_size} px"
    print_summary(head, med, "timm", args.rounds)


if __name__ == "__main__":
    main()
