"""Ours with davit's native CPU kernels (the default) against ours with torch's ops only, and timm.

    .venv/bin/python benchmarks/native_ab.py                       # eager training, davit_tiny b8, 9 rounds
    .venv/bin/python benchmarks/native_ab.py --compile --rounds 15
    .venv/bin/python benchmarks/native_ab.py --mode infer -b 16
    .venv/bin/python benchmarks/native_ab.py --mode infer -b 16 --calls   # per call of each kernel
    # an AVX2-only CPU emulated on an AVX-512 one: the kernels built for AVX2, torch held to AVX2, and an
    # inductor cache of its own (inductor's cache key misses the capability: AVX2 code taken from the shared
    # cache by an AVX-512 process wrote past its buffers, docs/benchmarks.md session 49)
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-avx2 \
        .venv/bin/python benchmarks/native_ab.py --march haswell --mode infer -b 16

Three steps in one process: ours with the kernels on (``davit.layers.native``: window and channel attention
and position encodings forward and backward, training's bias + GELU and weight gradients, layer norms; on
whatever CPU, ``set_native_kernels(True)``: by default they run on AVX-512 and AVX2 builds), ours with
``set_native_kernels(False)`` and timm's
model with identical weights (with ``--compile`` each compiled once, inductor's defaults, batch axis
dynamic, ours with ``fullgraph=True``; ours without kernels is traced with them off, as a distinct backend,
so that it holds torch's ops rather than reusing the first graph). Each round runs three calls of each in
turn, the order turning by one each round; the summary is the median over rounds of each one's per-round
median relative to timm's, and the median and quartiles of the per-round ratios (a slow spell of the
machine hits both steps of a round alike). A training step is `davit bench`'s: zero-grad, forward,
cross-entropy, backward, fused AdamW. Without timm installed its column is left out.

``--calls`` times each kernel's call instead (window attention, layer norm, position encoding, channel
attention, in inference) on the model's maps at the batch size against torch's ops for the same result,
alternating, after a 64 MB pass each, median of ``--rounds``. ``--march NAME`` builds the kernels with
``-march=NAME`` instead of the machine's own (``native``), in a cache of its own name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ab_rounds import build, compile_caches_off, interleaved_medians, paired, parser, print_summary, warm_up

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


def _call_pairs(kind: str, batch: int, H: int, W: int, C: int, split: int, ws: int) -> dict[str, tuple]:
    # {kernel: (its call, torch's ops for the same result)} for one block's map of the model
    import torch.nn.functional as F

    from davit.layers import attention

    x = torch.randn(batch, H, W, C)
    w, b, cw = torch.randn(C), torch.randn(C), torch.randn(C, 1, 3, 3)
    pairs = {
        "layer norm": (lambda: native.layer_norm(x, w, b, 1e-5), lambda: F.layer_norm(x, (C,), w, b)),
        "position encoding": (lambda: native.pos_enc(x, cw, b), lambda: native._torch_pos_enc(x, cw, b)),
    }
    if kind == "window" and H % ws == 0 and W % ws == 0:
        qkv = torch.randn(batch, H, W, 3 * C)
        pairs["window attention"] = (
            lambda: native.window_attention_map(qkv, split, ws),
            lambda: native._torch_window_attention(qkv, split, ws, H, W),
        )
    elif kind == "channel":
        rows = torch.randn(batch, H * W, 3 * C)
        pairs["channel attention"] = (
            lambda: native._channel_attention_call(rows, split, False, False),
            lambda: attention._channel_attention_per_group(rows, split, False),
        )
    return pairs


def per_call(model: str, batch: int, img: int, rounds: int) -> None:
    """Each kernel against torch's ops on the model's block maps (inference), per call."""
    import statistics
    import time

    from davit import create_model
    from davit.layers.blocks import ChannelBlock, SpatialBlock

    net = create_model(model).eval()
    maps: dict[tuple, tuple[int, int]] = {}  # (kind, B, H, W, C) -> (heads or groups, window size)

    def keep(kind: str, split: int, ws: int) -> Callable:
        def hook(_module, inputs) -> None:
            maps.setdefault((kind, *inputs[0].shape), (split, ws))

        return hook

    hooks = []
    for m in net.modules():
        if isinstance(m, SpatialBlock):
            hooks.append(m.register_forward_pre_hook(keep("window", m.attn.num_heads, m.window_size)))
        elif isinstance(m, ChannelBlock):
            hooks.append(m.register_forward_pre_hook(keep("channel", m.attn.groups, 0)))
    with torch.inference_mode():
        net(torch.randn(1, 3, img, img))
    for h in hooks:
        h.remove()
    junk = torch.empty(16 << 20)

    def timed(fn: Callable[[], object]) -> float:
        junk.add_(1)  # out of cache, as in a step
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    print(f"{model} inference calls at batch {batch}, {img} px, median of {rounds} (ms): kernel vs torch's")
    with torch.inference_mode():
        for (kind, _, H, W, C), (split, ws) in maps.items():
            for name, (mine, theirs) in _call_pairs(kind, batch, H, W, C, split, ws).items():
                k, o = [], []
                for _ in range(rounds):
                    k.append(timed(mine))
                    o.append(timed(theirs))
                km, om = statistics.median(k) * 1e3, statistics.median(o) * 1e3
                print(f"  {kind} block {H}x{W}x{C}, {name}: {km:.2f} vs {om:.2f} ({om / km:.2f}x)")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--compile", action="store_true", help="compile each model (torch.compile, inductor)")
    p.add_argument("--calls", action="store_true", help="each kernel's call against torch's ops instead")
    p.add_argument("--march", default=None, help="build the kernels for -march=MARCH (default: native)")
    args = p.parse_args()

    if args.march:  # before the library is first built or loaded
        native._FLAGS = [f"-march={args.march}" if f == "-march=native" else f for f in native._FLAGS]
    native.set_native_kernels(True)
    lib = native.native_library()
    if lib is None:
        raise SystemExit(f"the native kernels are not available: {native.build_error()}")
    print(f"kernels: {lib._name} (vectors of {lib.davit_native_vector_bits()} bits); "
          f"torch's CPU capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    native.set_native_kernels(None)
    torch.manual_seed(0)
    if args.calls:
        native.set_native_kernels(True)
        try:
            per_call(args.model, args.batch_size, args.img_size, args.rounds)
        finally:
            native.set_native_kernels(None)
        return
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    if args.compile:
        torch._dynamo.mark_dynamic(x, 0)
        compile_caches_off()  # each model compiles its own graphs
    steps: dict[str, Callable[[], object]] = {}
    for name, on in (("ours, native kernels", True), ("ours, torch's ops", False), ("timm", None)):
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
