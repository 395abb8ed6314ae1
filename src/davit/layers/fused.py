"""Guarded oneDNN kernels for the CPU fp32 linears: eager inference, training and compiled code.

``torch.ops.mkldnn._linear_pointwise`` runs a linear layer with its bias and an optional epilogue (exact GELU,
or an elementwise add of a residual) in one pass over the output. On the 2-core AVX2 machines of PERF_NOTES.md
it is also faster than ``F.linear`` for the plain linear: ``addmm`` first copies the bias into every output
row (an extra full pass over a fresh, page-faulting buffer), and for some shapes (stage-1 qkv,
50176 x 96 -> 288) MKL's path for a transposed weight runs at half speed. Results are bit-identical to the
plain ops on the shapes we test.

They are private operators, so every use is behind a guard and the plain path stays for other dtypes and
devices, autocast, tracing and export.

Training and ``torch.compile`` use the plain linear through :func:`onednn_linear`, a registered custom
operator (fake-tensor rule and autograd formula included, so ``fullgraph=True`` compiles it as one opaque
call; compiled inference also its forward-only GELU and residual-add variants, and each block's norms
with its MLP branch and attention on chunks of tokens, :data:`INFER_OP_CHUNK_TOKENS`): forward, input
and weight gradients run in oneDNN (the weight gradient of weights over 1 M elements in ``mm``, see
below). Where it pays: on AMD CPUs with AVX-512 PyTorch's MKL runs fp32 GEMMs on its AVX2 path
(~185 GFLOP/s on 2 Zen 5 cores) while oneDNN uses AVX-512 (~410 GFLOP/s, docs/benchmarks.md, session 13); on
Zen 4, which runs AVX-512 on 256-bit units, both reach ~200 GFLOP/s and the op neither gains nor loses (timm's
training step: 0.97x with ``F.linear``, 0.99x with the op, session 21). On Intel AVX-512 CPUs MKL runs AVX-512
itself and the op lost 4-11% of the training step (sessions 14 and 29), so in training it is on by default on
AMD AVX-512 CPUs only (:func:`default_onednn_training`; ``DAVIT_ONEDNN_TRAINING=0/1`` overrides). Compiled
inference, where the ops fuse norms and epilogues as eager inference does, gains on both vendors and has its
own default, every AVX-512 or AVX2 CPU (:func:`default_onednn_compiled_inference`;
``DAVIT_ONEDNN_COMPILED_INFERENCE=0/1`` overrides). The weight gradient comes from davit's native kernel where
it applies (:func:`davit.layers.native.linear_weight_grad`, AVX-512), and the input gradient then alone from
the linear kernel on the transposed weight, read as a view (:func:`_input_grad`; compiled:
:func:`linear_input_grad`); elsewhere both come from one 1x1 convolution backward over the rows (no transposed
copy of the weight; in compiled code as the opaque :func:`conv_linear_grads`). Through the linear kernel the
weight gradient would need transposed copies of both activations and ran slower than ``mm``.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import native

__all__ = [
    "INFER_OP_CHUNK_TOKENS",
    "bias_apart",
    "conv",
    "conv2d",
    "conv_weight_grad",
    "fused_compiled_inference",
    "fused_cpu_inference",
    "has_hooks",
    "linear",
    "onednn_linear",
    "onednn_linear_add",
    "onednn_linear_gelu",
    "onednn_norm_mlp_add",
    "layer_norm_rows",
    "default_inference_onednn_gemms",
    "default_onednn_compiled_inference",
    "inference_onednn_gemms_enabled",
    "infer_linear",
    "infer_linear_add",
    "default_onednn_training",
    "onednn_compiled_inference_enabled",
    "onednn_training",
    "onednn_training_enabled",
    "opaque_conv",
    "PACK_MAX_ELEMENTS",
    "compiled_packed_weights_enabled",
    "default_compiled_packed_weights",
    "default_packed_weights",
    "packed_weight",
    "packed_weight_bytes",
    "packed_weights_enabled",
    "set_packed_weights",
    "set_compiled_packed_weights",
    "set_inference_onednn_gemms",
    "set_onednn_compiled_inference",
    "set_onednn_training",
    "set_opaque_convs",
    "set_bias_apart",
    "set_input_grad_linear",
    "linear_input_grad",
    "set_train_mlp",
    "set_plain_train_mlp",
    "plain_train_mlp",
    "plain_train_mlp_enabled",
    "default_plain_train_mlp",
    "train_mlp",
    "train_mlp_applies",
]


def _mkldnn_fusions_available() -> bool:
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


_MKLDNN = _mkldnn_fusions_available()


def fused_cpu_inference(x: Tensor) -> bool:
    """True where the fused inference kernels (:func:`infer_linear`, :func:`infer_linear_add`: oneDNN's, or
    MKL's GEMMs with in-place epilogues) may replace the plain ops: CPU fp32 inference in eager mode."""
    return (
        _MKLDNN
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        # under bf16 autocast the plain ops run in bf16; fused ones would not
        and not torch.is_autocast_enabled("cpu")
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_scripting()
    )


def default_inference_onednn_gemms(vendor: str | None = None, capability: str | None = None) -> bool:
    """Whether CPU fp32 inference (eager, and inside compiled inference's opaque ops, whose small linears
    run on packed oneDNN weights either way: :func:`default_compiled_packed_weights`) runs its linears in
    oneDNN (fused with GELU or the residual add) by default, or in MKL (``F.linear``, then GELU and the add in
    place on its output): oneDNN except on Intel CPUs with AVX-512. There MKL's fp32 GEMMs are as fast as or
    faster than oneDNN's, and the unfused epilogue on the fresh output costs about what the fusion saves:
    forward time oneDNN / MKL, eager, 1.034 and 1.008 for davit_small, 1.026 for davit_base, 1.007 and 1.002
    for davit_tiny; compiled 1.071 for davit_small, 1.000 for davit_tiny (batch 16, 224 px, medians of 13-31
    paired rounds, Xeon with AMX, session 29; fc1 + GELU alone at 3136 tokens and dims 192/384/768:
    5.6/19.0/77.6 ms with MKL and an in-place GELU, 7.8/20.1/85.5 ms fused). On AMD CPUs MKL runs AVX2 GEMMs
    and oneDNN's fused kernels win. ``DAVIT_ONEDNN_INFERENCE_GEMMS=1`` or ``0`` overrides."""
    env = _env_switch("DAVIT_ONEDNN_INFERENCE_GEMMS")
    if env is not None:
        return env
    vendor = _cpu_vendor() if vendor is None else vendor
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return not (vendor == "GenuineIntel" and capability.startswith("AVX512"))


def inference_onednn_gemms_enabled() -> bool:
    """Whether CPU fp32 inference runs its linears in oneDNN now (``davit bench`` prints it)."""
    return _INFER_ONEDNN_GEMMS


def set_inference_onednn_gemms(enable: bool) -> bool:
    """Run CPU fp32 inference's linears in oneDNN's fused kernels or in MKL with in-place epilogues;
    the default is :func:`default_inference_onednn_gemms`. Returns the previous setting."""
    global _INFER_ONEDNN_GEMMS
    previous, _INFER_ONEDNN_GEMMS = _INFER_ONEDNN_GEMMS, bool(enable)
    return previous


# ----- CPU fp32 inference: small weights kept in oneDNN's blocked layout ------------------------------------
#: With packed weights on (:func:`set_packed_weights`, ``DAVIT_INFER_PACKED_WEIGHTS=1``), inference keeps a
#: oneDNN-blocked copy of each linear weight of up to this many elements (1 MiB in fp32) and runs the linear
#: through oneDNN with it (:func:`packed_weight`). MKL and unpacked oneDNN reorder the weight into their
#: blocked layout on every call, which for the small weights of the first stages is a sizeable share of a GEMM
#: over a 3136-token chunk. davit_tiny's forward (batch 16, 224 px, Xeon with AMX, medians of 15 interleaved
#: rounds in one process, session 31): compiled 1.026-1.155x (four runs; 1.040x and 1.049x typical), eager
#: 0.998-1.048x; unpacked oneDNN for the same weights 0.98-1.01x, so the layout is what gains. Larger weights
#: gain less per call and would double their memory: all weights packed measured 0.947-1.039x eager. For
#: davit_tiny the copies take 8 MB (stages 1-2 and stage 3's projections). Off by default in eager inference:
#: on the fixed inputs of the timm parity test (tests/test_weights.py) davit_small's third stage map came out
#: 1.11 map bounds from the float64 one against timm's 0.73, which that test's accuracy criterion rejects,
#: although over eight other inputs its error relative to timm's (0.53-1.52x) was no larger than with MKL's
#: GEMMs (0.69-2.16x). On by default inside compiled inference's opaque ops, where the gain is larger
#: (:func:`default_compiled_packed_weights`).
PACK_MAX_ELEMENTS = 1 << 18
_PACK_ROWS_HINT = 3136  # oneDNN picks the blocked layout for this many rows: the chunks inference runs on
_PACKED_SWITCH = ("packed weights", "the weights as they are")  # what 1 and 0 mean, for _env_switch's warning

# id(weight) -> (a weak reference to it, its version/storage/shape when packed, the packed copy); an entry
# goes when its weight is freed, and is remade when the weight changed (in-place update, ``.data`` swap)
_PACKED: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}


def default_packed_weights() -> bool:
    """Whether CPU fp32 inference runs small linears (:data:`PACK_MAX_ELEMENTS`) through oneDNN with packed
    weights by default: off (see :data:`PACK_MAX_ELEMENTS` for why); ``DAVIT_INFER_PACKED_WEIGHTS=1`` turns
    them on where oneDNN is available."""
    return bool(_MKLDNN and _env_switch("DAVIT_INFER_PACKED_WEIGHTS", *_PACKED_SWITCH))


def packed_weights_enabled() -> bool:
    """Whether eager CPU fp32 inference runs its small linears with packed oneDNN weights now."""
    return _PACKED_WEIGHTS


def default_compiled_packed_weights() -> bool:
    """Whether compiled CPU fp32 inference's opaque ops (:func:`fused_compiled_inference`) run small linears
    (:data:`PACK_MAX_ELEMENTS`) through oneDNN with packed weights by default: yes where oneDNN is available.
    The compiled forward at batch 16, 224 px, packed against MKL's GEMMs in the same process (medians of
    11-21 interleaved rounds, Xeon with AMX): davit_tiny 1.026-1.155x in session 31 and 1.033-1.051x in
    session 35, davit_small 1.125x; the outputs' error from float64 no larger than with MKL's GEMMs
    (docs/benchmarks.md, session 35). ``DAVIT_COMPILED_PACKED_WEIGHTS=0`` or ``1`` overrides."""
    env = _env_switch("DAVIT_COMPILED_PACKED_WEIGHTS", *_PACKED_SWITCH)
    return _MKLDNN and (True if env is None else env)


def compiled_packed_weights_enabled() -> bool:
    """Whether compiled CPU fp32 inference's opaque ops run small linears with packed oneDNN weights now."""
    return _COMPILED_PACKED


def set_compiled_packed_weights(enable: bool) -> bool:
    """Turn packed weights in compiled inference's opaque ops on or off (A/B timing, tests); the default is
    :func:`default_compiled_packed_weights`. The ops read it when they run, so no recompile follows. Returns
    the previous setting."""
    global _COMPILED_PACKED
    previous, _COMPILED_PACKED = _COMPILED_PACKED, bool(enable)
    if not enable:
        _PACKED.clear()  # copies the other setting still wants are remade on their next use
    return previous


def set_packed_weights(enable: bool) -> bool:
    """Turn packed inference weights on or off (A/B timing, tests); off also drops the packed copies. The
    default is :func:`default_packed_weights`. Returns the previous setting."""
    global _PACKED_WEIGHTS
    previous, _PACKED_WEIGHTS = _PACKED_WEIGHTS, bool(enable)
    if not enable:
        _PACKED.clear()  # copies the other setting still wants are remade on their next use
    return previous


def _weight_state(weight: Tensor) -> tuple:
    return (weight._version, weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype)


def _forget(key: int, _ref: weakref.ref) -> None:
    entry = _PACKED.get(key)
    if entry is not None and entry[0] is _ref:
        del _PACKED[key]


def packed_weight(weight: Tensor, compiled: bool = False) -> Tensor | None:
    """oneDNN's blocked copy of a linear's ``weight`` (out x in, fp32) for inference, made on first use and
    kept while ``weight`` lives unchanged; ``None`` where packed weights are off (eager inference's setting,
    or with ``compiled`` compiled inference's) or do not apply (too large, an inference-mode tensor, which
    keeps no version counter to tell an in-place update)."""
    on = _PACKED_WEIGHTS or (compiled and _COMPILED_PACKED)
    if not on or weight.numel() > PACK_MAX_ELEMENTS or weight.dtype != torch.float32:
        return None
    if weight.is_inference() or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    key, state = id(weight), _weight_state(weight)
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == state:
        return entry[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS_HINT)
    ref = weakref.ref(weight, functools.partial(_forget, key))
    _PACKED[key] = (ref, state, packed)
    return packed


def packed_weight_bytes() -> int:
    """Bytes held by the packed inference weights of live tensors (``davit bench`` counts them as state)."""
    return sum(e[2].numel() * e[2].element_size() for e in _PACKED.values() if e[0]() is not None)


def infer_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, epilogue: str = "none", compiled: bool = False
) -> Tensor:
    """CPU fp32 inference (eager where :func:`fused_cpu_inference` holds, and with ``compiled`` in compiled
    inference's opaque ops): ``F.linear(x, weight, bias)``, with ``epilogue`` "gelu" (exact) applied to it, in
    oneDNN's fused kernel (with a packed weight where :func:`packed_weight` gives one) or MKL's GEMM (see
    :func:`default_inference_onednn_gemms`), or, where :func:`gelu_apart` holds, the GEMM without its bias and
    the native bias + GELU in place on its output; equal to fp32 round-off either way."""
    if epilogue == "gelu" and gelu_apart(x, weight, bias):
        return native.bias_gelu_(infer_linear(x, weight, None, "none", compiled), bias)
    algorithm = "" if epilogue == "none" else "none"  # GELU's: exact, not tanh
    packed = packed_weight(weight, compiled)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, epilogue, [], algorithm)
    if _INFER_ONEDNN_GEMMS:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, epilogue, [], algorithm)
    y = F.linear(x, weight, bias)
    # in place: the GEMM's fresh output is still in cache, and no second map is allocated
    return torch.ops.aten.gelu_(y) if epilogue == "gelu" else y


def default_gelu_apart(capability: str | None = None) -> bool:
    """Whether CPU fp32 inference runs an fc1's GELU apart from its GEMM by default (:func:`gelu_apart`):
    where torch's CPU capability is not AVX-512. oneDNN's GELU epilogue in AVX2 code ran at 0.76-0.90x the
    speed of the GEMM without its bias then the native bias + GELU in place, per call on davit_tiny's fc1
    shapes (3136 x 96/192/384 -> 384/768/1536 and 784 x 768 -> 3072, an AVX2-only CPU emulated on the Zen 4
    VM, session 48); with AVX-512, 0.98-1.00x: unchanged there."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return not capability.startswith("AVX512")


def set_gelu_apart(enable: bool | None) -> bool:
    """Run CPU fp32 inference's fc1 GELU apart from the GEMM (:func:`gelu_apart`) or fused with it;
    ``None``: the default (:func:`default_gelu_apart`). Returns the previous setting."""
    global _GELU_APART
    previous, _GELU_APART = _GELU_APART, default_gelu_apart() if enable is None else bool(enable)
    return previous


def gelu_apart(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`infer_linear` runs ``gelu(F.linear(x, weight, bias))`` as the GEMM without its bias,
    then :func:`davit.layers.native.bias_gelu_` in place: its setting (:func:`default_gelu_apart`), the
    output's width a multiple of 16, and the native kernels on."""
    return _GELU_APART and native.bias_gelu_supports(x, weight.shape[0], bias)


def infer_linear_add(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, compiled: bool = False
) -> Tensor:
    """CPU fp32 inference: ``F.linear(x, weight, bias) + residual`` in oneDNN's fused kernel or as MKL's
    GEMM and an in-place add (see :func:`default_inference_onednn_gemms`; packed weights and ``compiled`` as
    in :func:`infer_linear`)."""
    packed = packed_weight(weight, compiled)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
    if _INFER_ONEDNN_GEMMS:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return F.linear(x, weight, bias).add_(residual)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks; fused paths that bypass its ``forward`` must not be taken
    then (davit.viz records attention through a hook on each ``attn.qkv``)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


# ----- the plain linear as a custom operator: training (eager and compiled) and compiled inference ---------
@torch.library.custom_op("davit::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` computed by oneDNN (CPU fp32); differentiable, traceable by dynamo."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


@onednn_linear.register_fake
def _linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_linear_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    gx, gw, gb = _linear_grads(g2, x2, weight, need_x, need_w, ctx.has_bias and need_b)
    return None if gx is None else gx.view(x.shape), gw, gb


def _linear_grads(
    g2: Tensor, x2: Tensor, weight: Tensor, need_x: bool, need_w: bool, need_b: bool, plain: bool = False
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The input, weight and bias gradients (those asked for, else None) of a linear of (M, K) rows ``x2`` to
    (M, N) rows with output gradient ``g2``, as the training linears compute them (eager or traced); with
    ``plain``, as autograd computes ``F.linear``'s (``mm`` and a column sum: MKL's GEMMs)."""
    if plain:
        return (
            g2 @ weight if need_x else None,
            g2.t() @ x2 if need_w else None,
            g2.sum(0) if need_b else None,
        )
    gx = gw = gb = None
    # the weight gradient from the native kernel where it applies (1.13-1.65x the rate of oneDNN's
    # convolution backward and a column sum, 0.94-1.25x MKL's mm on davit_tiny's shapes, docs/benchmarks.md
    # session 42) with the bias gradient (session 43), after the input gradient alone from oneDNN's linear
    # on the transposed weight (_input_grad, session 47)
    # (compiled code keeps mm for weights above _MAX_CONV_WGRAD: with the kernel there, davit_tiny's compiled
    # step at batch 8 peaked at 880 MB above its state, at the end of the backward with stage 4's two 9 MB
    # MLP weight gradients live, against 873 MB with mm, and above timm's (/tmp/s42/peak.py, session 42))
    native_w = (
        need_w
        and native.linear_weight_grad_supports(g2, x2)
        and not (torch.compiler.is_compiling() and weight.numel() > _MAX_CONV_WGRAD)
    )
    # oneDNN's convolution sums per-thread partial weight gradients in a scratch buffer of the weight's size:
    # for stage 4's 768 x 3072 MLP weights (9.4 MB) that raised the training step's peak above timm's (1207
    # vs 1198 MB, davit_tiny at batch 8), so large weights keep ``mm``
    conv_w = need_w and not native_w and weight.numel() <= _MAX_CONV_WGRAD
    if need_x:
        # alone: oneDNN's linear on the transposed weight (see _input_grad); with the weight's: both from one
        # 1x1 convolution backward (see _conv_grads); compiled: as opaque ops
        if not conv_w and _INPUT_GRAD_LINEAR:
            gx = linear_input_grad(g2, weight) if torch.compiler.is_compiling() else _input_grad(g2, weight)
        elif torch.compiler.is_compiling():
            grads = conv_linear_grads(g2, x2, weight, conv_w)
            gx, gw = grads[0], (grads[1] if conv_w else None)
        else:
            gx, gw = _conv_grads(g2, x2, weight, True, conv_w)  # gw: None unless conv_w
    elif conv_w:
        gw = conv_weight_grad(g2, x2) if torch.compiler.is_compiling() else _weight_grad(g2, x2)
    if native_w:
        gw, gb = native.linear_weight_grad(g2, x2, need_b)
        gb = gb if need_b else None
    if need_w and not (conv_w or native_w):
        gw = g2.t() @ x2
    if need_b and not native_w:
        gb = g2.sum(0)
    return gx, gw, gb


# davit.layers.fused.set_input_grad_linear(False): training's input gradients from the convolution backward
# (A/B timing, tests)
_INPUT_GRAD_LINEAR = True


def set_input_grad_linear(enable: bool) -> bool:
    """Let CPU training compute a linear's input gradient, where its weight gradient does not come from the
    same convolution backward, as oneDNN's linear on the transposed weight (:func:`_input_grad`, compiled:
    :func:`linear_input_grad`; the default), or as the data gradient of a 1x1 convolution backward
    (:func:`_conv_grads`). Read when torch.compile traces the backward. Returns the previous setting."""
    global _INPUT_GRAD_LINEAR
    previous, _INPUT_GRAD_LINEAR = _INPUT_GRAD_LINEAR, bool(enable)
    return previous


def _input_grad(g: Tensor, weight: Tensor) -> Tensor:
    """``g @ weight`` for (M, N) rows ``g`` and the (N, K) weight: oneDNN's linear with the transposed weight
    as a view, which it reads in place (as the MLP's hidden gradient does). Where the weight gradient comes
    from the native kernel, so the convolution backward would compute the input gradient alone, this is
    1.01-1.14x its speed on each of davit_tiny's shapes after a 64 MB pass (228 against 237 ms per training
    step at batch 8, 2 threads, Zen 4 VM, session 47; `/tmp/s47/dx.py`): the convolution's backward data
    primitive on (1, C, M, 1) maps, not a GEMM's blocking."""
    return torch.ops.mkldnn._linear_pointwise(g.contiguous(), weight.t(), None, "none", [], "")


@torch.library.custom_op("davit::linear_input_grad", mutates_args=())
def linear_input_grad(g: Tensor, weight: Tensor) -> Tensor:
    """:func:`_input_grad` as an opaque operator, for compiled code (traced in the open, the weight's
    transposed view could be given inductor's own layout: a copy)."""
    return _input_grad(g, weight)


@linear_input_grad.register_fake
def _(g: Tensor, weight: Tensor) -> Tensor:
    return g.new_empty((g.shape[0], weight.shape[1]))


def _rows_as_map(t: Tensor) -> Tensor:
    """(M, C) rows as the channels-last (1, C, M, 1) map they exactly are (a free view of contiguous rows)."""
    m, c = t.shape
    return t.contiguous().view(1, m, 1, c).permute(0, 3, 1, 2)


def _conv_grads(
    g: Tensor, x: Tensor, weight: Tensor, input_grad: bool, weight_grad: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``(g @ weight, g.t() @ x)`` for (M, N) rows ``g``, (M, K) rows ``x`` and the (N, K) weight, either or
    both, as the input and weight gradients of one 1x1 convolution backward over the rows' channels-last
    views: no transposed copy of the weight (the linear kernel needs one for the input gradient), and one
    call for both. Eager davit_tiny training at batch 8 (``davit bench --mode train --vs-timm``, Zen 4 VM,
    session 28): 1.03x, 1.03x and 1.01x timm against 0.98x, 0.97x and 0.97x with the linear kernel and a
    separate weight gradient, alternating runs, same peak memory."""
    (m, n), k = g.shape, x.shape[1]
    gx, gw, _ = torch.ops.aten.convolution_backward(
        _rows_as_map(g),
        _rows_as_map(x),
        weight.view(n, k, 1, 1),
        None,
        [1, 1],
        [0, 0],
        [1, 1],
        False,
        [0, 0],
        1,
        [input_grad, weight_grad, False],
    )
    return (
        None if gx is None else gx.permute(0, 2, 3, 1).reshape(m, k),
        None if gw is None else gw.reshape(n, k),
    )


_MAX_CONV_WGRAD = 1 << 20  # weight elements (4 MB in fp32)


def _weight_grad(g: Tensor, x: Tensor) -> Tensor:
    """``g.t() @ x`` for (M, N) and (M, K) rows, as the weight gradient of a 1x1 convolution over an (M, 1)
    channels-last map, which oneDNN computes with AVX-512 where MKL's ``mm`` stays on AVX2: 1.1-1.8x the
    rate of ``mm`` on davit_tiny's shapes (Zen 5, session 13). Both views are free: (M, C) rows are
    exactly a channels-last (1, C, M, 1) tensor."""
    n, k = g.shape[1], x.shape[1]
    w = x.new_empty((n, 1, 1, k)).permute(0, 3, 1, 2)  # only its shape and layout are read
    gv, xv = _rows_as_map(g), _rows_as_map(x)
    return torch.ops.aten.convolution_backward(
        gv, xv, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1].view(n, k)


@torch.library.custom_op("davit::conv_weight_grad", mutates_args=())
def conv_weight_grad(g: Tensor, x: Tensor) -> Tensor:
    """:func:`_weight_grad` as an opaque operator, for compiled code. Traced in the open, the convolution's
    (1, C, M, 1) views got inductor's own layout: it copied the activations into transposed buffers before
    the call, and the convolution ran on that layout. davit_tiny's compiled training step at batch 8 on the
    Zen 4 VM of session 21 (``torch._inductor.config.cpp.enable_kernel_profile``): inductor's kernels 564 ->
    436 ms, the convolution backward 455 -> 375 ms, the step 1944-1984 -> 1725-1762 ms (0.77x -> 0.93x
    timm's compiled step in ``davit bench``). Where the input gradient is wanted too, both come from
    :func:`conv_linear_grads` (eager: :func:`_conv_grads`)."""
    return _weight_grad(g, x)


@conv_weight_grad.register_fake
def _(g: Tensor, x: Tensor) -> Tensor:
    return g.new_empty((g.shape[1], x.shape[1]))


@torch.library.custom_op("davit::conv_linear_grads", mutates_args=())
def conv_linear_grads(g: Tensor, x: Tensor, weight: Tensor, weight_grad: bool) -> list[Tensor]:
    """``[g @ weight]``, or ``[g @ weight, g.t() @ x]`` with ``weight_grad``: :func:`_conv_grads` as an opaque
    operator, the backward of :func:`onednn_linear` in compiled code (traced in the open, inductor would
    re-lay out the convolution's views, see :func:`conv_weight_grad`). davit_tiny's compiled training step at
    batch 8 (``davit bench --mode train --compile --vs-timm``, Zen 4 VM, session 28): 1.10x, 1.12x, 1.11x and
    1.10x timm against 1.10x, 1.08x, 1.07x and 1.06x with the linear kernel on the transposed weight,
    alternating runs; peak memory 1184 against 1192 MB (timm 1198)."""
    gx, gw = _conv_grads(g, x, weight, True, weight_grad)
    return [gx, gw] if weight_grad else [gx]


@conv_linear_grads.register_fake
def _(g: Tensor, x: Tensor, weight: Tensor, weight_grad: bool) -> list[Tensor]:
    gx = x.new_empty(x.shape)
    return [gx, weight.new_empty(weight.shape)] if weight_grad else [gx]


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)

# below this many multiply-adds per call the custom op's dispatch (tens of microseconds in eager) eats what
# the faster GEMM gives: the Fashion-MNIST demo model's training step (largest linear 16.8 M MACs at batch
# 64) ran at 46.4 ms with its larger linears on oneDNN against 45.1 ms on F.linear (median of 6 interleaved
# rounds, session 13), so it stays on F.linear; davit_tiny's linears at batch 8 and 224 px: 0.23-0.92 G MACs
_MIN_MACS = 1 << 25


def _cpu_fp32_linear(x: Tensor, layer: nn.Linear) -> bool:
    # what the training linears' rewrites (oneDNN's, the MLP function's) ask of a call: CPU fp32 input and
    # weight outside autocast, not TorchScript, the layer unhooked (its hooks fire on the module call)
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and layer.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not has_hooks(layer)
    )


def onednn_training(x: Tensor, layer: nn.Linear) -> bool:
    """True where :func:`onednn_linear` replaces ``layer(x)``: CPU fp32 outside autocast, large enough, not
    traced or exported (ONNX sees the plain op), eager or compiled, where the setting for the mode holds
    (compiled inference: :func:`set_onednn_compiled_inference`; otherwise :func:`set_onednn_training`)."""
    return (
        _MKLDNN
        and _onednn_wanted()
        and _cpu_fp32_linear(x, layer)
        and not torch.compiler.is_exporting()
        # with symbolic sizes (torch.compile: dynamic batch or image size) a plain comparison would guard on
        # the size and recompile on its other side; such a graph keeps oneDNN unless the layer is below the
        # floor for every size it serves (with symbolic H and W nothing is, and requiring the floor for every
        # size instead left all linears on F.linear: davit_tiny b8 224 px 634 ms against 496 ms static)
        and not statically_known_true(x.numel() * layer.out_features < _MIN_MACS)
    )


def _cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo ("AuthenticAMD", "GenuineIntel"), "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _env_switch(name: str, on: str = "oneDNN", off: str = "F.linear") -> bool | None:
    """``True``/``False`` where the environment variable ``name`` is 1/0, ``None`` where it is unset (or
    anything else, with a warning that says so and what ``on`` and ``off`` mean)."""
    env = os.environ.get(name, "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        warnings.warn(f"{name}={env!r} ignored: set it to 1 ({on}) or 0 ({off})", stacklevel=3)
    return None


def default_onednn_training(vendor: str | None = None, capability: str | None = None) -> bool:
    """Whether training linears (eager and compiled) use oneDNN by default: on AMD CPUs with AVX-512 only.

    The gain comes from MKL running its AVX2 GEMMs on AMD CPUs (Zen 5: 1.04x -> 1.53x timm's training step,
    session 13). On an Intel AVX-512 CPU MKL already runs AVX-512, and the op made davit_tiny's training step
    slower: 8-11% with the weight gradient through transposed copies (Xeon with AMX, session 14), still 4-5%
    with the gradients from one convolution backward (eager 1190 vs 1140 ms, compiled 1232 vs 1170 ms, medians
    of 7 interleaved rounds, Xeon family 6 model 207, session 29, ``benchmarks/onednn_ab.py``).
    ``DAVIT_ONEDNN_TRAINING=1`` or ``0`` overrides."""
    env = _env_switch("DAVIT_ONEDNN_TRAINING")
    if env is not None:
        return env
    vendor = _cpu_vendor() if vendor is None else vendor
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return vendor == "AuthenticAMD" and capability.startswith("AVX512")


def default_onednn_compiled_inference(capability: str | None = None) -> bool:
    """Whether compiled CPU fp32 inference runs its linears, and each block's norm with its MLP branch or
    attention, as opaque oneDNN ops (:func:`fused_compiled_inference`) by default: on x86 CPUs with AVX-512 or
    AVX2 (torch's CPU capability). Inside them run eager inference's kernels (:func:`infer_linear`) on chunks
    of tokens. Against inductor's graph with ``F.linear`` davit_tiny's compiled forward (batch 16, 224 px) ran
    783 vs 878 ms on an Intel Xeon with AMX (oneDNN's GEMMs inside; medians of 7 interleaved rounds, session
    29, ``benchmarks/onednn_ab.py --mode infer -b 16 --compile``), 1.14-1.22x against 1.03-1.04x timm's
    compiled model on Zen 4 (sessions 27-28), and 1142 vs 1265 ms (1.146x against 1.035x timm's compiled
    step, 9 rounds, session 49) on an AVX2-only CPU emulated on that Zen 4 (torch, oneDNN and MKL held to
    AVX2). Elsewhere (no AVX2: unmeasured) inductor's graph. ``DAVIT_ONEDNN_COMPILED_INFERENCE=1`` or ``0``
    overrides."""
    env = _env_switch("DAVIT_ONEDNN_COMPILED_INFERENCE")
    if env is not None:
        return env
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return capability.startswith("AVX512") or capability == "AVX2"


# davit.layers.fused.set_onednn_training(False) / set_onednn_compiled_inference(False): F.linear there
_ONEDNN_TRAINING = default_onednn_training()
_ONEDNN_COMPILED_INFERENCE = default_onednn_compiled_inference()
_INFER_ONEDNN_GEMMS = default_inference_onednn_gemms()
_GELU_APART = default_gelu_apart()
_PACKED_WEIGHTS = default_packed_weights()
_COMPILED_PACKED = default_compiled_packed_weights()


def _onednn_wanted() -> bool:
    # no gradients under torch.compile: compiled inference, with its own default (on Intel AVX-512 CPUs oneDNN
    # wins there and loses in training); dynamo guards on both settings and on the grad mode
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return _ONEDNN_COMPILED_INFERENCE
    return _ONEDNN_TRAINING


def onednn_training_enabled() -> bool:
    """Whether training linears (eager and compiled) go through :func:`onednn_linear` now (``davit bench``
    prints it next to its figures)."""
    return _ONEDNN_TRAINING


def set_onednn_training(enable: bool) -> bool:
    """Route training linears through oneDNN or keep ``F.linear`` (A/B timing, tests); the default is
    :func:`default_onednn_training`. Returns the previous setting."""
    global _ONEDNN_TRAINING
    previous, _ONEDNN_TRAINING = _ONEDNN_TRAINING, bool(enable)
    return previous


def onednn_compiled_inference_enabled() -> bool:
    """Whether compiled CPU fp32 inference runs the opaque oneDNN ops now (``davit bench`` prints it)."""
    return _ONEDNN_COMPILED_INFERENCE


def set_onednn_compiled_inference(enable: bool) -> bool:
    """Run compiled CPU fp32 inference through the opaque oneDNN ops or inductor's graph with ``F.linear``;
    the default is :func:`default_onednn_compiled_inference`. Returns the previous setting."""
    global _ONEDNN_COMPILED_INFERENCE
    previous, _ONEDNN_COMPILED_INFERENCE = _ONEDNN_COMPILED_INFERENCE, bool(enable)
    return previous


# ----- compiled CPU inference: a linear and its epilogue as one opaque oneDNN call --------------------------
@torch.library.custom_op("davit::onednn_linear_gelu", mutates_args=())
def onednn_linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``gelu(F.linear(x, weight, bias))`` (exact GELU) by :func:`infer_linear` (one oneDNN kernel, or MKL's
    GEMM and an in-place GELU); inference only (no autograd)."""
    return infer_linear(x.contiguous(), weight, bias, "gelu", compiled=True)


onednn_linear_gelu.register_fake(_linear_fake)


@torch.library.custom_op("davit::onednn_linear_add", mutates_args=())
def onednn_linear_add(x: Tensor, other: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias) + other`` by :func:`infer_linear_add` (one oneDNN kernel, or MKL's GEMM and
    an in-place add); inference only (no autograd)."""
    return infer_linear_add(x.contiguous(), other.contiguous(), weight, bias, compiled=True)


@onednn_linear_add.register_fake
def _(x: Tensor, other: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _linear_fake(x, weight, bias)


#: Compiled CPU inference runs each block's layer norm with the MLP branch or with the attention (the qkv
#: projection and the attention) as one opaque call on chunks of about this many tokens (whole windows, whole
#: images for the attentions; one 56 x 56 map, as eager inference slices the batch,
#: davit.models.INFER_CHUNK_TOKENS). Traced in the open, the first stage's qkv (58 MB) and MLP hidden map
#: (77 MB) at batch 16 and 224 px are allocated above glibc's largest mmap threshold (32 MiB), so mapped
#: fresh, faulted in and unmapped on every call; in chunks they come from the heap and stay in cache.
#: davit_tiny's compiled step at batch 16 (``davit bench --compile --vs-timm``, Zen 4 VM, session 27): 914
#: and 897 ms against 1074 and 1090 ms before, 1.18x and 1.21x timm's compiled step (1.04x and 1.03x before);
#: minor page faults per step 42-48 k against 104-132 k. With the norms inside the ops too (session 28) the
#: normed maps are never written whole either: the step's peak allocation 74 instead of 81 MB, same speed.
INFER_OP_CHUNK_TOKENS = 3136


def layer_norm_rows(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.layer_norm`` over the last dimension: the norm the chunked ops of compiled inference apply, in the
    native kernel where it runs (davit.layers.native.layer_norm)."""
    if native.layer_norm_supports(x, weight, bias):
        return native.layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@torch.library.custom_op("davit::onednn_norm_mlp_add", mutates_args=())
def onednn_norm_mlp_add(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
) -> Tensor:
    """``x + F.linear(gelu(F.linear(layer_norm(x), w1, b1)), w2, b2)`` (exact GELU), a block's norm and MLP
    branch, on chunks of :data:`INFER_OP_CHUNK_TOKENS` rows with the eager kernels (:func:`infer_linear`,
    :func:`infer_linear_add`); inference only (no autograd)."""
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_empty(rows.shape)
    step = INFER_OP_CHUNK_TOKENS
    for i in range(0, rows.shape[0], step):
        part = rows[i : i + step].contiguous()
        t = layer_norm_rows(part, norm_weight, norm_bias, eps)
        h = infer_linear(t, w1, b1, "gelu", compiled=True)
        out[i : i + step] = infer_linear_add(h, part, w2, b2, compiled=True)
    return out.view(x.shape)


@onednn_norm_mlp_add.register_fake
def _(x: Tensor, *_) -> Tensor:
    return x.new_empty(x.shape)


def fused_compiled_inference(x: Tensor, layer: nn.Linear) -> bool:
    """True where compiled CPU fp32 inference runs ``layer`` with its GELU or residual add as one opaque
    oneDNN call (:func:`onednn_linear_gelu`, :func:`onednn_linear_add`), as eager inference does, instead
    of the linear then a separate pass of inductor's over its output (at batch 16, 224 px, the first stage's
    GELU reads and writes a 77 MB map). Inductor fuses such epilogues itself only with its weight-freezing
    option. Where :func:`onednn_training` holds with compiled inference's setting
    (:func:`default_onednn_compiled_inference`), no gradients (the ops have no autograd formula). The same
    test gates the chunked norm + MLP and norm + attention ops (:data:`INFER_OP_CHUNK_TOKENS`)."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled() and onednn_training(x, layer)


# davit.layers.fused.set_bias_apart(False): compiled training keeps F.linear's addmm (A/B timing, tests)
_BIAS_APART = True


def set_bias_apart(enable: bool) -> bool:
    """Let compiled CPU fp32 training add linears' biases as separate adds that inductor fuses into the
    consumer (see :func:`bias_apart`; the default) or keep ``F.linear``. Returns the previous setting."""
    global _BIAS_APART
    previous, _BIAS_APART = _BIAS_APART, bool(enable)
    return previous


def bias_apart(x: Tensor, layer: nn.Linear) -> bool:
    """True where :func:`linear` computes ``layer(x)`` as ``F.linear(x, weight) + bias``: in compiled CPU fp32
    training (torch.compile, not export) of a biased, unhooked layer. ``F.linear`` with a bias is aten's
    addmm, which on CPU first writes the bias into every row of its output and then accumulates the product
    onto it: a whole extra pass over the output, 40 ms of copies in a compiled davit_tiny training step at
    batch 8, 224 px. Apart, the add joins the kernel inductor writes for the consumer anyway (GELU, the
    residual add, the channel attention's re-layout; in the backward the bias gradient's sum joins GELU's
    or the norm's), so it costs no pass of its own. Step 1.029x as fast (medians of 21 interleaved rounds;
    per-round ratios' median 1.039x; Xeon family 6 model 207, session 37)."""
    return _BIAS_APART and layer.bias is not None and compiled_cpu_fp32_training(x, layer)


_NATIVE_BIAS_GELU = True


def set_native_bias_gelu(enable: bool) -> bool:
    """Let CPU fp32 training run its MLPs' bias + GELU in the native kernel where :func:`native_bias_gelu`
    says (the default), or in torch's GELU (eager) and inductor's kernels (compiled). Read when torch.compile
    traces, and by eager code on each call. Returns the previous setting."""
    global _NATIVE_BIAS_GELU
    previous, _NATIVE_BIAS_GELU = _NATIVE_BIAS_GELU, bool(enable)
    return previous


def native_bias_gelu(x: Tensor, layer: nn.Linear) -> bool:
    """True where ``gelu(layer(x))`` runs as ``native.bias_gelu(F.linear(x, weight), bias)`` (or
    :func:`onednn_linear` without its bias where :func:`onednn_training` holds): in compiled CPU fp32
    training (see :func:`compiled_cpu_fp32_training`), and in eager CPU fp32 training where the linears run
    on oneDNN (:func:`onednn_training`: AMD AVX-512 CPUs by default), the layer's width a multiple of 16 and
    the native library available.

    Compiled: inductor's kernels for the bias add and GELU, and for GELU's backward with the bias
    gradient's sum, took 31 and 54 ms of a compiled davit_tiny training step at batch 8 (kernel profile,
    session 38); in paired profiles the operator's forward and backward took 80 ms per step where those
    kernels took 101 ms. With oneDNN's linears (AMD AVX-512 CPUs) inductor also recomputed the last stages'
    GELUs at the end of the forward graph, to save them for fc2's weight gradient (one 82 ms kernel, Zen 4,
    session 39); the operator's output is saved as it is (the step 1.016x and 1.028x in paired rounds).

    Eager, after oneDNN's linears: the step 1.023x, 1.024x and 1.010x in paired rounds (davit_tiny, batch 8,
    Zen 4, session 40): torch's GELU and its backward are no slower than the kernel, but the operator's
    backward also yields the bias gradient, a separate column sum otherwise. After ``F.linear`` (Intel's
    default) eager training keeps torch's GELU: 0.982x there (session 38)."""
    if not _NATIVE_BIAS_GELU:
        return False
    if compiled_cpu_fp32_training(x, layer):
        return native.bias_gelu_supports(x, layer.out_features, layer.bias)
    return (
        not torch.compiler.is_compiling()  # (compiled code that is not fp32 training: not here, no guards)
        and torch.is_grad_enabled()
        and onednn_training(x, layer)
        and native.bias_gelu_supports(x, layer.out_features, layer.bias)
    )


# ----- CPU training: an MLP as one function (compiled: one op), GELU's backward in a GEMM's epilogue ------
def _train_mlp_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, plain: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    # y (x's leading shape), and the (M, hidden) maps the backward reads: gelu(a) and gelu'(a); the GEMMs
    # oneDNN's, or with ``plain`` F.linear's (MKL)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if plain:
        a = F.linear(x2, w1)
    else:
        a = torch.ops.mkldnn._linear_pointwise(x2, w1, None, "none", [], "")
    h = native.bias_gelu_with_grad_(a, b1)  # a now holds gelu'(a + b1)
    y = F.linear(h, w2, b2) if plain else torch.ops.mkldnn._linear_pointwise(h, w2, b2, "none", [], "")
    return y.view(*x.shape[:-1], w2.shape[0]), h, a


def _hidden_grad(g: Tensor, d: Tensor, w2: Tensor, plain: bool = False) -> Tensor:
    # the hidden pre-activation's gradient (g @ w2) * gelu' in one pass: the product goes through the linear
    # kernel with the transposed weight as a view (oneDNN reads it in place) and its epilogue; ``plain``:
    # MKL's mm, then the product in place while the GEMM's output is partly in cache
    if plain:
        return torch.mm(g, w2).mul_(d)
    return torch.ops.mkldnn._linear_pointwise.binary(g, d, w2.t(), None, "mul")


@torch.library.custom_op("davit::mlp_hidden_grad", mutates_args=())
def mlp_hidden_grad(g: Tensor, d: Tensor, w2: Tensor) -> Tensor:
    """``(g @ w2) * d`` for (M, N) rows ``g``, the (N, H) weight ``w2`` and (M, H) ``d`` in one oneDNN call,
    as an opaque op for compiled code (the backward of :func:`train_mlp_op`)."""
    return _hidden_grad(g.contiguous(), d.contiguous(), w2)


@mlp_hidden_grad.register_fake
def _(g: Tensor, d: Tensor, w2: Tensor) -> Tensor:
    return g.new_empty((g.shape[0], w2.shape[1]))


def _train_mlp_backward(
    grad: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    h: Tensor,
    d: Tensor,
    mask: list[bool],
    op: bool,
    plain: bool = False,
) -> list[Tensor | None]:
    # the gradients of x, w1, b1, w2, b2 that ``mask`` asks for (None for the others); for the operator
    # (``op``: traced by torch.compile) as separate opaque ops, in this order, so each saved map is freed
    # after its last use (one opaque call for all kept both hidden maps to the end and raised the compiled
    # step's peak above timm's: 1205 vs 1198 MB)
    need_x, need_w1, need_b1, need_w2, need_b2 = mask
    g = grad.reshape(-1, grad.shape[-1]).contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    gx = gw1 = gb1 = ga = None
    if need_x or need_w1 or need_b1:
        ga = mlp_hidden_grad(g, d, w2) if op and not plain else _hidden_grad(g, d, w2, plain)
    _, gw2, gb2 = _linear_grads(g, h, w2, False, need_w2, need_b2, plain)
    if ga is not None:
        gx, gw1, gb1 = _linear_grads(ga, x2, w1, need_x, need_w1, need_b1, plain)
    return [None if gx is None else gx.view(x.shape), gw1, gb1, gw2, gb2]


class _TrainMlp(torch.autograd.Function):
    """``F.linear(gelu(F.linear(x, w1, b1)), w2, b2)`` (exact GELU) for eager CPU fp32 training, see
    :func:`train_mlp`; ``plain``: the GEMMs F.linear's and mm's (MKL) instead of oneDNN's. The same forward
    and backward as :func:`train_mlp_op`, without the custom operator's dispatch: eager, with the operator
    instead, paired steps gave 0.996x (13 rounds, quartiles 0.981-1.003, session 44) where this function
    gave 1.005x."""

    @staticmethod
    def forward(
        ctx, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, plain: bool
    ) -> Tensor:
        y, h, d = _train_mlp_forward(x, w1, b1, w2, b2, plain)
        _train_mlp_keep(ctx, (x, w1, b1, w2, b2), h, d)
        ctx.plain = plain
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (*_train_mlp_grads(ctx, grad, False, ctx.plain), None)


def _train_mlp_keep(ctx, inputs: tuple, h: Tensor, d: Tensor) -> None:
    # what both registrations keep for the backward: fc1's input, the weights, the two hidden maps
    x, w1, b1, w2, b2 = inputs
    ctx.save_for_backward(x, w1, w2, h, d)
    ctx.has_bias = (b1 is not None, b2 is not None)


def _train_mlp_grads(ctx, grad: Tensor, op: bool, plain: bool = False) -> tuple[Tensor | None, ...]:
    x, w1, w2, h, d = ctx.saved_tensors
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    mask = [need_x, need_w1, ctx.has_bias[0] and need_b1, need_w2, ctx.has_bias[1] and need_b2]
    return tuple(_train_mlp_backward(grad, x, w1, w2, h, d, mask, op, plain))


@torch.library.custom_op("davit::train_mlp", mutates_args=())
def train_mlp_op(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, plain: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`train_mlp` as one opaque call for compiled CPU fp32 training: ``(y, h, d)``, the MLP's output
    and the hidden maps its backward reads (GELU's output and derivative, (M, hidden)); differentiable in
    ``y`` (its backward: :func:`mlp_hidden_grad` and the linears' gradient ops; with ``plain``, the GEMMs
    ``F.linear``'s and the backward traced in the open: ``mm``, the product and the column sums)."""
    return _train_mlp_forward(x, w1, b1, w2, b2, plain)


@train_mlp_op.register_fake
def _(
    x: Tensor, w1: Tensor, _b1: Tensor | None, w2: Tensor, _b2: Tensor | None, _plain: bool = False
) -> tuple[Tensor, ...]:
    rows = x.numel() // x.shape[-1]
    hidden = x.new_empty((rows, w1.shape[0]))
    return x.new_empty((*x.shape[:-1], w2.shape[0])), hidden, torch.empty_like(hidden)


def _train_mlp_setup(ctx, inputs, output) -> None:
    _, h, d = output
    _train_mlp_keep(ctx, inputs[:5], h, d)
    ctx.plain = len(inputs) > 5 and bool(inputs[5])


def _train_mlp_grad(ctx, grad: Tensor, _grad_h: Tensor | None, _grad_d: Tensor | None):
    return (*_train_mlp_grads(ctx, grad, True, ctx.plain), None)


train_mlp_op.register_autograd(_train_mlp_grad, setup_context=_train_mlp_setup)


_TRAIN_MLP = True


def set_train_mlp(enable: bool) -> bool:
    """Let CPU fp32 training (eager, and compiled when torch.compile traces) run its MLPs as
    :func:`train_mlp` where :func:`train_mlp_applies` (the default) or as oneDNN's linears with the native
    bias + GELU between them (A/B timing, tests). Returns the previous setting."""
    global _TRAIN_MLP
    previous, _TRAIN_MLP = _TRAIN_MLP, bool(enable)
    return previous


def default_plain_train_mlp(capability: str | None = None) -> bool:
    """Whether CPU fp32 training (eager and compiled) runs its MLPs as :func:`train_mlp` with ``F.linear``'s
    GEMMs (MKL) where oneDNN's training linears are off (:func:`plain_train_mlp`) by default: where torch's
    CPU capability is AVX2. On an AVX2-only CPU emulated on the Zen 4 VM (session 49) torch's GELU backward
    took 51 ms of davit_tiny's eager training step at batch 8 and GELU 26 ms (``benchmarks/profile_step.py
    --task gemm-rates``); the function's forward writes GELU's derivative with its output (and adds fc1's
    bias, which F.linear writes into the output first), and its backward multiplies by it. Each MLP's
    forward and backward, paired calls after a 64 MB pass: 1.111x, 1.051x, 1.014x, 1.055x as fast on the
    four stages' shapes (~52 ms per step); the step 1.021x (15 paired rounds, quartiles 0.945-1.054, a
    noisy hour). Compiled, as one opaque op per MLP with its backward traced in the open, where inductor's
    kernels ran the bias + GELU's backward: the step 1.062x (11 paired rounds, quartiles 1.027-1.135), peak
    memory 1185 MB (timm's 1198). Unmeasured on Intel AVX-512 CPUs (the others with oneDNN's training
    linears off): they keep the three ops."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return capability == "AVX2"


_PLAIN_TRAIN_MLP = default_plain_train_mlp()


def set_plain_train_mlp(enable: bool | None) -> bool:
    """Let CPU fp32 training run its MLPs as :func:`train_mlp` with ``F.linear``'s GEMMs where
    :func:`plain_train_mlp` says, or as the three ops; ``None``: the default
    (:func:`default_plain_train_mlp`). Read by eager code on each call and when torch.compile traces.
    Returns the previous setting."""
    global _PLAIN_TRAIN_MLP
    previous = _PLAIN_TRAIN_MLP
    _PLAIN_TRAIN_MLP = default_plain_train_mlp() if enable is None else bool(enable)
    return previous


def plain_train_mlp_enabled() -> bool:
    """The setting of :func:`set_plain_train_mlp` (``davit bench`` prints it)."""
    return _PLAIN_TRAIN_MLP


def plain_train_mlp(x: Tensor, layer: nn.Linear) -> bool:
    """True where :func:`train_mlp` computes an MLP with fc1 ``layer`` on ``x`` with ``F.linear``'s and
    ``mm``'s GEMMs (MKL) instead of oneDNN's: CPU fp32 training with oneDNN's training linears off for the
    layer (:func:`onednn_training`), the setting on (:func:`set_plain_train_mlp`; AVX2 CPUs by default), the
    native bias + GELU available for the layer's width and the layer unhooked; compiled (see
    :func:`compiled_cpu_fp32_training`) or eager (not traced), where the layer is at least as large as the
    oneDNN linears' floor (``_MIN_MACS``: small models keep the three ops, unmeasured there)."""
    if not (
        _PLAIN_TRAIN_MLP
        and not onednn_training(x, layer)
        and native.bias_gelu_supports(x, layer.out_features, layer.bias)
    ):
        return False
    if torch.compiler.is_compiling():
        return compiled_cpu_fp32_training(x, layer)
    return (
        torch.is_grad_enabled()
        and _cpu_fp32_linear(x, layer)
        and x.numel() * layer.out_features >= _MIN_MACS
    )


def train_mlp_applies(x: Tensor, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear) -> bool:
    """True where :func:`train_mlp` computes ``fc2(act(fc1(x)))``: CPU fp32 training, eager or compiled (not
    export), with oneDNN's linears (:func:`onednn_training`) and the native bias + GELU
    (:func:`native_bias_gelu`), or with ``F.linear``'s GEMMs (:func:`plain_train_mlp`); the exact GELU,
    no hooks on the three layers, fc2 in fp32 with fc1's hidden width and ``x`` rows of fc1's width."""
    return (
        _TRAIN_MLP
        and type(act) is nn.GELU
        and act.approximate == "none"
        and not has_hooks(act)
        and not has_hooks(fc2)
        and fc2.weight.dtype == torch.float32
        and fc2.in_features == fc1.out_features
        and x.shape[-1] == fc1.in_features
        and ((native_bias_gelu(x, fc1) and onednn_training(x, fc1)) or plain_train_mlp(x, fc1))
    )


def train_mlp(x: Tensor, fc1: nn.Linear, fc2: nn.Linear) -> Tensor:
    """``fc2(gelu(fc1(x)))`` where :func:`train_mlp_applies`, as one autograd function (compiled: the opaque
    :func:`train_mlp_op`): oneDNN's linears, the native bias + GELU pass also writing GELU's derivative over
    the pre-activation it no longer needs, and in the backward the hidden gradient as fc2's input-gradient
    GEMM with that derivative multiplied in its epilogue (no separate pass of GELU's backward; fc1's bias
    gradient comes with its weight gradient from the native kernel). Saves as much as the three ops did
    (fc1's input, the hidden map, the derivative in place of the pre-activation). Same results to fp32
    round-off. davit_tiny's training step at batch 8 (Zen 4 VM, session 44, ``benchmarks/switch_ab.py
    --switch train_mlp``, per-round ratios of paired steps): eager 1.005x (15 rounds), compiled 1.016x (13
    rounds; peak memory 1192 instead of 1198 MB). Where oneDNN's training linears are off
    (:func:`plain_train_mlp`) the GEMMs are ``F.linear``'s and ``mm``'s (MKL) and the derivative is multiplied
    in after fc2's input-gradient GEMM, as a separate pass (eager: in place) that replaces GELU's backward."""
    plain = not onednn_training(x, fc1)
    if torch.compiler.is_compiling():
        return train_mlp_op(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, plain)[0]
    return _TrainMlp.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, plain)


def compiled_cpu_fp32_training(x: Tensor, layer: nn.Module) -> bool:
    """Whether compiled CPU training's rewrites apply to ``layer`` run on ``x``: torch.compile (not export:
    ONNX and exported programs see the plain ops) with gradients, CPU fp32 outside autocast, the layer
    unhooked (:func:`bias_apart`, :func:`conv`, :func:`native_bias_gelu`, the MLP chunks of
    ``davit.layers.blocks.Mlp``)."""
    return (
        torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and layer.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not has_hooks(layer)
    )


def linear(x: Tensor, layer: nn.Linear, fast: bool = True, consumer_fuses: bool = True) -> Tensor:
    """``layer(x)``: in CPU fp32 eager inference through :func:`infer_linear` (oneDNN or MKL by CPU), in
    training and compiled code through :func:`onednn_linear` where its setting holds, unless the layer is
    hooked; else in compiled training with the bias added apart (:func:`bias_apart`) unless the caller says
    the output's consumer takes no fused add (``consumer_fuses=False``: the window attention's qkv, and the
    channel attention's where the native kernel reads it, go to an attention kernel on strided views, so the
    add would be a pass of its own)."""
    if fast and fused_cpu_inference(x) and not has_hooks(layer):
        return infer_linear(x, layer.weight, layer.bias)
    if fast and onednn_training(x, layer):
        return onednn_linear(x, layer.weight, layer.bias)
    if fast and consumer_fuses and bias_apart(x, layer):
        return F.linear(x, layer.weight) + layer.bias
    return layer(x)  # the module call, so hooks on it still fire


# ----- compiled CPU fp32 code: convolutions as opaque calls -------------------------------------------------
# Inductor turns its layout optimisation on for every CPU graph that holds a convolution (torch 2.14's
# ``GraphLowering.decide_layout_opt``: with oneDNN available, unconditionally). In DaViT the convolutions are
# the stem, the downsampling and the depthwise position encodings, and the optimisation then re-lays out the
# residual stream and the saved activations around them (transposed (B, W, C, H) buffers that later kernels
# transpose back, docs/benchmarks.md, session 22). As opaque operators the convolutions run on the layouts
# eager code gives them, the graph holds no ``aten.convolution``, and the optimisation stays off:
# davit_tiny's compiled CPU training step at batch 8 took 1637 instead of 1885 ms (medians of 9 interleaved
# rounds in one process, Zen 4 VM, session 26), as fast as the eager step (1641 ms).


def _conv_strides(shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...]:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)


def _channels_last(x: Tensor) -> bool:
    """The layout the op's results take: channels-last where ``x`` has unit channel stride (a permuted NHWC
    map), else NCHW. One rule for the real and the fake kernels (inductor checks that they agree). The test
    guards on no symbolic size: a contiguous map's channel stride H * W is not known to be 1, so it counts as
    NCHW, as it does for concrete sizes above one pixel."""
    return x.shape[1] > 1 and statically_known_true(x.stride(1) == 1)


def _in_layout(y: Tensor, channels_last: bool) -> Tensor:
    """``y`` with exactly the strides :func:`_conv_strides` gives (a copy only where they differ: oneDNN may
    return another layout for small maps, and size-one dimensions carry arbitrary strides)."""
    strides = _conv_strides(tuple(y.shape), channels_last)
    if y.stride() == strides:
        return y
    return y.new_empty_strided(y.shape, strides).copy_(y)


def _conv_out_shape(x: Tensor, weight: Tensor, stride: list[int], padding: list[int]) -> tuple[int, ...]:
    h = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
    return (x.shape[0], weight.shape[0], h, w)


@torch.library.custom_op("davit::conv2d", mutates_args=())
def conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], groups: int
) -> Tensor:
    """``F.conv2d`` (dilation 1, zero padding) as one opaque call for compiled CPU code; differentiable."""
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, 1, groups)
    return _in_layout(y, _channels_last(x))


@conv2d.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], groups: int):
    shape = _conv_out_shape(x, weight, stride, padding)
    return x.new_empty_strided(shape, _conv_strides(shape, _channels_last(x)))


@torch.library.custom_op("davit::conv2d_backward", mutates_args=())
def conv2d_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    groups: int,
    mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Input, weight and bias gradients of :func:`conv2d` (those ``mask`` asks for; empty tensors for the
    others: a custom operator cannot return None)."""
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]], stride, padding, [1, 1], False, [0, 0], groups, mask
    )
    return (
        _in_layout(gx, _channels_last(x)) if mask[0] else x.new_empty(0),
        _in_layout(gw, False) if mask[1] else weight.new_empty(0),
        gb.contiguous() if mask[2] else weight.new_empty(0),
    )


@conv2d_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int], groups: int, mask):
    gx = x.new_empty_strided(x.shape, _conv_strides(tuple(x.shape), _channels_last(x)))
    gw = weight.new_empty_strided(weight.shape, _conv_strides(tuple(weight.shape), False))
    gb = weight.new_empty(weight.shape[0])
    none = weight.new_empty(0)
    return (gx if mask[0] else x.new_empty(0), gw if mask[1] else none, gb if mask[2] else none)


def _conv2d_setup(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.conf = (stride, padding, groups, bias is not None)


def _conv2d_grad(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    stride, padding, groups, has_bias = ctx.conf
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = conv2d_backward(grad, x, weight, stride, padding, groups, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None, None)


conv2d.register_autograd(_conv2d_grad, setup_context=_conv2d_setup)

# davit.layers.fused.set_opaque_convs(False): compiled graphs get the plain aten convolutions (A/B timing)
_OPAQUE_CONVS = True


def set_opaque_convs(enable: bool) -> bool:
    """Run convolutions in compiled CPU fp32 code as :func:`conv2d` (the default) or as plain convolutions
    (inductor then turns its layout optimisation on). Returns the previous setting."""
    global _OPAQUE_CONVS
    previous, _OPAQUE_CONVS = _OPAQUE_CONVS, bool(enable)
    return previous


def opaque_conv(x: Tensor, layer: nn.Conv2d) -> bool:
    """True where :func:`conv` runs ``layer`` as :func:`conv2d`: under torch.compile (not export: ONNX and
    exported programs see the plain op), with gradients (training: compiled inference was no faster with
    the ops, 1017 vs 997 ms at batch 16, session 26), CPU fp32 outside autocast (the case measured), a plain
    zero-padded convolution without dilation or hooks."""
    return (
        _OPAQUE_CONVS
        and layer.dilation == (1, 1)
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
        and compiled_cpu_fp32_training(x, layer)
    )


def conv(x: Tensor, layer: nn.Conv2d, fast: bool = True) -> Tensor:
    """``layer(x)``; in compiled CPU fp32 code as the opaque :func:`conv2d` (see :func:`opaque_conv`) unless
    ``fast`` is off (the model's reference path)."""
    if fast and opaque_conv(x, layer):
        return conv2d(x, layer.weight, layer.bias, list(layer.stride), list(layer.padding), layer.groups)
    return layer(x)
