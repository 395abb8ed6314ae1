"""One of ours' speed switches on (its default) against off, and timm, paired in one process.

    .venv/bin/python benchmarks/switch_ab.py --switch pos_enc                     # eager training, b8
    .venv/bin/python benchmarks/switch_ab.py --switch pos_enc --compile --rounds 15
    .venv/bin/python benchmarks/switch_ab.py --switch pos_enc --mode infer -b 16 --compile

Switches (each a ``set_*`` function returning the previous setting):

- ``pos_enc``: the position encodings in davit's native kernel (``davit.layers.native.pos_enc``), against
  torch's depthwise convolution and add;
- ``channel``: the channel attention (training and inference) in davit's native kernel
  (``davit.layers.native.channel_attention``), against torch's matmuls (per group in eager code, batched in
  compiled training);
- ``bias_gelu``: CPU training's MLPs with bias + GELU in the native kernel (compiled; eager after oneDNN's
  linears) (``davit.layers.fused.native_bias_gelu``), against inductor's kernels or torch's GELU;
- ``bias_apart``: compiled CPU training's linears with the bias added apart
  (``davit.layers.fused.bias_apart``), against ``F.linear``'s addmm;
- ``mlp_chunks``: compiled CPU training's large MLPs on chunks of tokens
  (``davit.layers.blocks.COMPILED_TRAIN_MLP_BATCH``), against whole maps;
- ``train_mlp``: CPU fp32 training's MLPs as one function (compiled: one opaque op) with GELU's backward in
  fc2's input-gradient GEMM (``davit.layers.fused.train_mlp``), against oneDNN's linears and the native
  bias + GELU ops;
- ``fork_norm``: eager CPU fp32 training's block norms as one function with the native kernels, the
  stream's skip gradient added in the norm's backward (``davit.layers.norm.LayerNorm.fork``), against torch's
  layer norm and autograd's sum;
- ``opaque_convs``: compiled CPU training's convolutions as opaque ops (``davit.layers.fused.conv``), against
  plain ``aten.convolution``;
- ``input_grad``: eager CPU training's linear input gradients (where the native kernel gives the weight
  gradient) as oneDNN's linear on the transposed weight (``davit.layers.fused.set_input_grad_linear``),
  against the data gradient of a 1x1 convolution backward;
- ``gelu_apart``: CPU fp32 inference's fc1 as the GEMM without its bias and the native bias + GELU in place
  (``davit.layers.fused.gelu_apart``; the default where torch's CPU capability is not AVX-512), against
  oneDNN's GELU epilogue (``--mode infer``);
- ``weight_grad``: CPU training's linear weight gradients in davit's native kernel
  (``davit.layers.native.linear_weight_grad``), against oneDNN's convolution backward (``mm`` for large
  weights). Read when the backward is traced.

With ``--compile`` the process turns the compile caches off (``ab_rounds.compile_caches_off``), so each
model compiles its own graphs.

Three steps: ours with the switch on, ours with it off, and timm's model with identical weights (with
``--compile`` each compiled once, inductor's defaults, batch axis dynamic, ours with ``fullgraph=True``; a
switch read while dynamo traces guards the graph, so each of ours gets its own). Each round runs three calls
of each in turn, the order turning by one each round; the summary is the median over rounds of each one's
per-round median relative to timm's, and the median and quartiles of the per-round ratios off / on (a slow
spell of the machine hits both steps of a round alike). A training step is `davit bench`'s: zero-grad,
forward, cross-entropy, backward, fused AdamW. Without timm installed its column is left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ab_rounds import (
    build,
    cache_hits,
    compile_caches_off,
    interleaved_medians,
    paired,
    parser,
    print_summary,
    under,
    warm_up,
)

from davit.bench import _make_step
from davit.layers import blocks, fused, native, norm

SWITCHES: dict[str, Callable[[bool], bool]] = {
    "pos_enc": native.set_pos_enc_kernel,
    "channel": native.set_channel_attention_kernel,
    "bias_gelu": fused.set_native_bias_gelu,
    "bias_apart": fused.set_bias_apart,
    "mlp_chunks": blocks.set_compiled_mlp_chunks,
    "opaque_convs": fused.set_opaque_convs,
    "train_mlp": fused.set_train_mlp,
    "input_grad": fused.set_input_grad_linear,
    "fork_norm": norm.set_fork_norm,
    "weight_grad": native.set_weight_grad_kernel,
    "gelu_apart": fused.set_gelu_apart,
    "plain_train_mlp": fused.set_plain_train_mlp,
}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--switch", choices=sorted(SWITCHES), required=True)
    p.add_argument("--compile", action="store_true", help="compile each model (torch.compile, inductor)")
    args = p.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    if args.compile:
        torch._dynamo.mark_dynamic(x, 0)
        compile_caches_off()
    on, off = f"ours, {args.switch} on", f"ours, {args.switch} off"
    steps: dict[str, Callable[[], object]] = {}
    for name in (on, off, "timm"):
        net = build(args.model, timm=name == "timm")
        if net is None:
            continue
        net.train(args.mode == "train")
        fn: Callable = torch.compile(net, fullgraph=name != "timm") if args.compile else net
        step, _ = _make_step(fn, x, args.mode, torch.float32, torch.device("cpu"), net)
        if name != "timm":
            step = under(SWITCHES[args.switch], name == on, step)
        warm_up(name, step)
        steps[name] = step

    per_round: dict[str, list[float]] = {}
    med = interleaved_medians(steps, args.rounds, per_round=per_round)
    how = "compiled" if args.compile else "eager"
    head = f"{args.model} {args.mode} {how} batch {args.batch_size}, {args.img_size} px"
    print_summary(head, med, "timm" if "timm" in med else off, args.rounds)
    if args.compile:
        print(f"  compile caches off: {cache_hits()} cache hits")
    print(f"  per-round off / on:   {paired(per_round, on, off)}")
    if "timm" in med:
        print(f"  per-round timm / on:  {paired(per_round, on, 'timm')}")


if __name__ == "__main__":
    main()
