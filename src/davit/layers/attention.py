"""The two DaViT attentions as plain tensor functions, with thin module wrappers.

Every function takes the fused ``qkv`` projection (last dim 3C, chunk order q, k, v as the checkpoints store
it) and returns the attended tokens *before* the output projection. The ``*_ref`` functions are the literal
formulations of SPEC section 3 and are what tests compare against; the un-suffixed functions are the fast
paths the model runs. Both must agree to fp32 round-off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import fused, native
from .fused import linear

__all__ = [
    "window_partition",
    "window_reverse",
    "window_partition_gather",
    "window_reverse_gather",
    "window_attention_ref",
    "window_attention",
    "window_attention_one_padded",
    "channel_attention_ref",
    "channel_attention",
    "WindowAttention",
    "ChannelAttention",
]


def window_partition(x: Tensor, ws: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of ``ws`` -> (B * nW, ws * ws, C)."""
    B, H, W, C = x.shape
    nh, nw = H // ws, W // ws
    # every size spelled out (no -1): with symbolic sizes under torch.compile, an inferred size is a division
    # of the element count that sympy cannot simplify, and such expressions compound from stage to stage
    x = x.view(B, nh, ws, nw, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, ws * ws, C)


def window_reverse(windows: Tensor, ws: int, H: int, W: int) -> Tensor:
    """(B * nW, ws * ws, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    nh, nw = H // ws, W // ws
    B = windows.shape[0] // (nh * nw)
    x = windows.view(B, nh, nw, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def known_true(cond: bool) -> bool:
    """``statically_known_true(cond)``: the condition itself for concrete sizes; for symbolic ones
    (torch.compile with dynamic shapes) true only if it holds for every size, without a guard.
    torch.jit.trace hands sizes as tensors; those are read by value, as a plain ``if`` did."""
    if isinstance(cond, Tensor):
        return bool(cond)
    return statically_known_true(cond)


def symbolic_sizes(*sizes: int) -> bool:
    """Whether any of ``sizes`` is symbolic: traced by torch.compile for every size (dynamic shapes).

    Dynamo presents a symbolic size as an ``int`` (isinstance and type say so), so the test asks whether its
    parity is known; for a concrete size it always is. A symbolic size whose parity the graph has fixed by a
    guard counts as concrete, which only costs that graph guards, never a wrong value. Outside torch.compile
    and torch.export (eager, torch.jit.trace) sizes are concrete: no test on the forward's hot path."""
    if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        return False
    return not all(known_true(n % 2 == 0) or known_true(n % 2 == 1) for n in sizes)


def window_index(B: int, H: int, W: int, ws: int, device: torch.device) -> Tensor:
    """Gather index for the windows of a (B, H, W) map zero-padded to whole windows: entry
    ``(b * nW + w) * ws * ws + t`` is the row of token t of window w of image b in the map flattened to
    (B * H * W, C) with one zero row appended (row B * H * W), the padding tokens' source.

    For symbolic sizes under torch.compile (see :func:`window_partition_gather`). Only flat 1-D index
    arithmetic: the number of windows per side never becomes a tensor dimension of its own."""
    nh, nw = (H + ws - 1) // ws, (W + ws - 1) // ws
    per_image = nh * nw * ws * ws
    b, k = _divmod(torch.arange(B * per_image, device=device), per_image)
    win, tok = _divmod(k, ws * ws)
    (r, c), (i, j) = _divmod(win, nw), _divmod(tok, ws)
    y, x = r * ws + i, c * ws + j
    return torch.where((y < H) & (x < W), b * (H * W) + y * W + x, B * H * W)


def unwindow_index(B: int, H: int, W: int, ws: int, device: torch.device) -> Tensor:
    """Inverse of :func:`window_index` on the real tokens: entry ``(b * H + y) * W + x`` is the row of pixel
    (y, x) of image b in the windows flattened to (B * nW * ws * ws, C); the padding tokens are dropped."""
    nh, nw = (H + ws - 1) // ws, (W + ws - 1) // ws
    b, k = _divmod(torch.arange(B * H * W, device=device), H * W)
    (y, x) = _divmod(k, W)
    (r, i), (c, j) = _divmod(y, ws), _divmod(x, ws)
    return ((b * nh + r) * nw + c) * (ws * ws) + i * ws + j


def _divmod(k: Tensor, n: int) -> tuple[Tensor, Tensor]:
    # k // n and k % n of non-negative k; the remainder by a multiply and subtract, because ONNX export
    # (torch.onnx, dynamo) has no remainder by a symbolic scalar
    q = torch.div(k, n, rounding_mode="floor")
    return q, k - q * n


def window_partition_gather(x: Tensor, ws: int) -> Tensor:
    """:func:`window_partition` of ``x`` (B, H, W, C) zero-padded to whole windows, as one gather.

    Under torch.compile with symbolic sizes the view-permute-reshape form makes the number of windows per
    side a dimension, and torch's shape logic guards on whether it is 1 (broadcasting, view and contiguity
    checks), as on whether padding is needed: the graph recompiles for each class of sizes (davit_tiny: 224
    px, last stage one window; 256 px, two per side, padded). Indexing with flat computed indices has no
    such branch, so one graph serves every size."""
    B, H, W, C = x.shape
    nW = ((H + ws - 1) // ws) * ((W + ws - 1) // ws)
    flat = torch.cat([x.reshape(B * H * W, C), x.new_zeros(1, C)])
    return flat.index_select(0, window_index(B, H, W, ws, x.device)).view(B * nW, ws * ws, C)


def window_reverse_gather(windows: Tensor, ws: int, B: int, H: int, W: int) -> Tensor:
    """(B * nW, ws * ws, C) -> (B, H, W, C) without padding: inverse of :func:`window_partition_gather`."""
    C = windows.shape[-1]
    flat = windows.reshape(windows.shape[0] * ws * ws, C)
    return flat.index_select(0, unwindow_index(B, H, W, ws, windows.device)).view(B, H, W, C)


def _split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    # (B, N, 3C) -> three (B, heads, N, C/heads) views; no copy
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _merge_heads(x: Tensor) -> Tensor:
    # (B, heads, N, d) -> (B, N, heads * d)
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


def window_attention_ref(qkv: Tensor, num_heads: int) -> Tensor:
    """Multi-head self-attention inside each window. qkv: (B*nW, L, 3C) -> (B*nW, L, C)."""
    q, k, v = _split_heads(qkv, num_heads)
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)
    return _merge_heads(attn.softmax(dim=-1) @ v)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v: the fused SDPA kernel, except for low-precision training on CPU.

    torch 2.14.1's CPU flash-attention backward in bfloat16 is 5-7x slower than two matmuls and a softmax at
    DaViT's window sizes (49 tokens, head dim 32; 2 threads, Intel AVX-512/AMX: 15.1 vs 2.3 ms forward +
    backward for 64 windows, 32.7 vs 6.0 ms for 144): davit_tiny's bf16-autocast training step took 1.9 s
    instead of 1.2 s (docs/benchmarks.md, session 19). There the attention is formed explicitly, as autocast
    would run the reference formulation (the CPU softmax accumulates in fp32 and rounds its output)."""
    low = q.dtype in (torch.bfloat16, torch.float16)
    if low and q.is_cpu and torch.is_grad_enabled() and q.requires_grad:
        # the scale as the GEMM's alpha (beta 0: the input is not read): the logits are rounded once, and
        # autograd keeps no scaled copy of q. Scaling after a matmul rounded them twice in bf16: the output's
        # and qkv's gradient's errors (relative L2 against float64) came to 1.16x and 1.12x the reference
        # formulation's, now 0.95x (head dim 32; session 53)
        B, h, Lq, d = q.shape
        q3, k3 = q.flatten(0, 1), k.flatten(0, 1)
        logits = torch.baddbmm(q3.new_empty(()).expand(B * h, Lq, k3.shape[1]), q3, k3.transpose(1, 2),
                               beta=0, alpha=d**-0.5).view(B, h, Lq, k3.shape[1])  # fmt: skip
        if mask is not None:  # offsets such as log(39) would round in bf16 (by up to 2^-8 of the logit)
            return (logits.float() + mask.float()).softmax(dim=-1).to(v.dtype) @ v
        return logits.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))


def window_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Fast path of :func:`window_attention_ref` (the fused SDPA kernel, or in bf16/fp16 CPU training the
    explicit form: :func:`_attention`)."""
    q, k, v = _split_heads(qkv, num_heads)
    return _merge_heads(_attention(q, k, v))


def window_attention_one_padded(qkv: Tensor, num_heads: int, pad_qkv: Tensor | None, n_pad: int) -> Tensor:
    """:func:`window_attention` for a map smaller than one window, without computing the padding.

    The release pads the normed map with zero tokens up to the window, so each of the ``n_pad`` padding tokens
    has qkv = the projection's bias (``pad_qkv``; zeros without bias): ``n_pad`` identical keys and values.
    Their share of the softmax equals that of ONE such key whose logit is raised by log(n_pad), and their
    queries are thrown away. So only the L real tokens plus one key are computed: on a 1x1 map in a 7x7 window
    that is 2 keys instead of 49 and a 49x smaller qkv projection.
    qkv: (B, L, 3C) of the real tokens -> (B, L, C).
    """
    B, L, C3 = qkv.shape
    pad = qkv.new_zeros(C3) if pad_qkv is None else pad_qkv.to(qkv.dtype)
    qkv = torch.cat([qkv, pad.view(1, 1, C3).expand(B, 1, C3)], dim=1)  # (B, L + 1, 3C)
    q, k, v = _split_heads(qkv, num_heads)
    # per key; at least fp32 (log(n_pad) is not exact in bf16: the pad's weight would be off by up to 0.8 %)
    dt = torch.promote_types(qkv.dtype, torch.float32)
    logit_offset = torch.cat([qkv.new_zeros(L, dtype=dt), qkv.new_full((1,), math.log(n_pad), dtype=dt)])
    logit_offset = logit_offset.view(1, L + 1)
    return _merge_heads(_attention(q[:, :, :L], k, v, logit_offset))


def channel_attention_ref(qkv: Tensor, groups: int, v2: bool = False) -> Tensor:
    """Channel group attention over all N positions. qkv: (B, N, 3C) -> (B, N, C).

    V1 (the ImageNet release): A = softmax((k * Cg^-0.5)^T v), out = (A q^T)^T, i.e. chunk 2 is the query,
    chunk 3 the key and chunk 1 the value. V2 (Florence-2): A = softmax(q^T k * N^-0.5), out = (A v^T)^T.
    """
    q, k, v = _split_heads(qkv, groups)  # each (B, G, N, Cg)
    N, cg = q.shape[-2], q.shape[-1]
    if v2:
        attn = ((q * N**-0.5).transpose(-1, -2) @ k).softmax(dim=-1)  # (B, G, Cg, Cg)
        out = (attn @ v.transpose(-1, -2)).transpose(-1, -2)
    else:
        attn = ((k * cg**-0.5).transpose(-1, -2) @ v).softmax(dim=-1)
        out = (attn @ q.transpose(-1, -2)).transpose(-1, -2)
    return _merge_heads(out)


def channel_attention(qkv: Tensor, groups: int, v2: bool = False) -> Tensor:
    """Fast path of :func:`channel_attention_ref`.

    On CPU in fp32 (eager or compiled, training and inference) davit's native kernel
    (:func:`davit.layers.native.channel_attention`). Elsewhere torch's matmuls, written as
    ``out = value @ A^T`` so the result comes out directly in (B, G, N, Cg) without the two transposes of the
    literal form, and the (Cg x Cg) logits are formed by one batched matmul over the strided views.
    """
    if native.channel_attention_supports(qkv, groups):
        # CPU fp32, eager and compiled: the native kernel (one opaque call per block in compiled code)
        return native.channel_attention(qkv, groups, v2)
    if 2 <= groups <= 8 and qkv.device.type == "cpu" and not _traced():
        if torch.is_grad_enabled() and qkv.requires_grad:
            if torch.is_autocast_enabled("cpu") and qkv.dtype == torch.float32:
                # the Function's backward runs outside autocast: give it qkv in the dtype its products run
                # in, as autocast would (an fp32 qkv met bf16 gradients there: a dtype error, session 52)
                qkv = qkv.to(torch.get_autocast_dtype("cpu"))
            return _ChannelAttentionPerGroup.apply(qkv, groups, v2)
        return _channel_attention_per_group(qkv, groups, v2)[0]
    q, k, v = _split_heads(qkv, groups)
    N, cg = q.shape[-2], q.shape[-1]
    if v2:
        query, key, value, scale = q, k, v, N**-0.5
    else:
        query, key, value, scale = k, v, q, cg**-0.5
    logits = torch.matmul(query.transpose(-1, -2), key)  # (B, G, Cg, Cg)
    # scaled and normalised in fp32 at least (the logits are tiny): in bf16 a scaling after the GEMM rounded
    # them a second time (see _channel_attention_per_group; no alpha here: these strided 4-d views do not
    # merge into one batch dim without a copy)
    attn = logits.to(torch.promote_types(logits.dtype, torch.float32)).mul_(scale).softmax(dim=-1)
    return _merge_heads(torch.matmul(value, attn.to(logits.dtype).transpose(-1, -2)))


def _traced() -> bool:
    """Tracing or compiling will see this op: keep to the batched formulation (one graph, no group loop)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def _roles(qkv: Tensor, groups: int, v2: bool) -> tuple[Tensor, Tensor, Tensor, float, tuple[int, int, int]]:
    """(query, key, value) column blocks of qkv (each (B, N, C), strided), the logit scale, and the chunk
    index of each role (V1: chunk 2 is the query, chunk 3 the key, chunk 1 the value)."""
    N, C = qkv.shape[1], qkv.shape[2] // 3
    chunks = (0, 1, 2) if v2 else (1, 2, 0)
    query, key, value = (qkv[..., i * C : (i + 1) * C] for i in chunks)
    scale = N**-0.5 if v2 else (C // groups) ** -0.5
    return query, key, value, scale, chunks


def _channel_attention_per_group(qkv: Tensor, groups: int, v2: bool) -> tuple[Tensor, list[Tensor]]:
    # CPU with few, large groups (stages 1-2): the batched form copies its (B, G, N, Cg) operands and output
    # because B and G of the strided qkv views cannot be merged into one batch dim (and in training keeps
    # those copies for the backward); one bmm per group works on the strided (B, N, Cg) column slices directly
    # and the output is assembled by one concatenation. Returns the output and each group's attention.
    query, key, value, scale, _ = _roles(qkv, groups, v2)
    cg = query.shape[-1] // groups
    outs, attns = [], []
    for g in range(groups):
        s = slice(g * cg, (g + 1) * cg)
        # the scale as the GEMM's alpha (beta 0: the input is not read): the scaled logits rounded once.
        # bmm then mul_ rounded them twice; under bf16 autocast a training step's gradients then came out
        # further from float64 than the reference path's (relative L2 error, median over a small model's
        # parameters 1.54x the reference's, the first layers' biases up to 3.8x; with alpha 1.05x and
        # 1.6x; session 52, docs/benchmarks.md)
        q_t = query[..., s].transpose(1, 2)
        unread = q_t.new_empty(()).expand(q_t.shape[0], cg, cg)
        attn = torch.baddbmm(unread, q_t, key[..., s], beta=0, alpha=scale).softmax(dim=-1)
        outs.append(torch.bmm(value[..., s], attn.transpose(1, 2)))
        attns.append(attn)
    return torch.cat(outs, dim=-1), attns


class _ChannelAttentionPerGroup(torch.autograd.Function):
    """Autograd for :func:`_channel_attention_per_group` that keeps only qkv (already alive as the
    projection's output) and the small (Cg x Cg) attentions, and writes the qkv gradient with one
    concatenation. Autograd through the slices would instead allocate a full-size qkv gradient per slice.
    Per group, with
    A = softmax(s Q^T K) and out = V A^T:  dV = dO A,  dA = dO^T V,  dS = A * (dA - rowsum(dA * A)),
    dQ = s K dS^T,  dK = s Q dS."""

    @staticmethod
    def forward(ctx, qkv: Tensor, groups: int, v2: bool) -> Tensor:  # type: ignore[override]
        out, attns = _channel_attention_per_group(qkv, groups, v2)
        ctx.groups, ctx.v2 = groups, v2
        ctx.save_for_backward(qkv, *attns)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        qkv, *attns = ctx.saved_tensors
        query, key, value, scale, chunks = _roles(qkv, ctx.groups, ctx.v2)
        C = query.shape[-1]
        cg = C // ctx.groups
        # each group's three gradients go straight into their columns of one buffer (bmm writes a strided
        # column block in place), not into parts concatenated after: one pass over the qkv gradient less;
        # forward + backward 1.41x as fast at davit_tiny's first stage (batch 8), level at the second
        # (per-round medians of 21 alternating rounds, session 37)
        d_qkv = qkv.new_empty(qkv.shape)

        def columns(chunk: int, g: int) -> Tensor:
            return d_qkv[..., chunk * C + g * cg : chunk * C + (g + 1) * cg]

        for g, a in enumerate(attns):
            s = slice(g * cg, (g + 1) * cg)
            d_out = grad[..., s]
            d_attn = torch.bmm(d_out.transpose(1, 2), value[..., s])
            # dS = A * (dA - rowsum(dA * A)), as autograd's softmax backward computes it: in fp32 for bf16
            # operands, rounded once. Written out in bf16 it rounded four times, the subtraction cancelling:
            # the qkv bias gradient of a small model's 2-group, 8-channel attention block came out 0.97-2.51x
            # (relative L2; mean 1.57x over six inputs) as far from float64 as the reference path's, now
            # 0.76-1.48x (mean 1.03x; session 53)
            d_logits = torch.ops.aten._softmax_backward_data(d_attn, a, -1, a.dtype)
            # the scale as the GEMMs' alpha, as in the forward
            dq, dk = columns(chunks[0], g), columns(chunks[1], g)
            torch.baddbmm(dq, key[..., s], d_logits.transpose(1, 2), beta=0, alpha=scale, out=dq)
            torch.baddbmm(dk, query[..., s], d_logits, beta=0, alpha=scale, out=dk)
            torch.bmm(d_out, a, out=columns(chunks[2], g))
        return d_qkv, None, None


# ----- compiled CPU inference: a block's norm, qkv projection and attention as one opaque call on chunks ---
# (why: davit.layers.fused.INFER_OP_CHUNK_TOKENS). Inside the ops the eager fast paths run, as eager CPU
# inference runs them: davit's native window-attention kernel (davit.layers.native; torch's SDPA where it
# does not run), one bmm per group for channel attention.
@torch.library.custom_op("davit::onednn_window_attention_map", mutates_args=())
def onednn_window_attention_map(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
    weight: Tensor,
    bias: Tensor | None,
    num_heads: int,
    window_size: int,
) -> Tensor:
    """A spatial block's window attention of its map ``x`` (B, H, W, C), before the output projection, per
    chunk of whole images: layer norm, zero padding to whole windows (after the norm, as in the release),
    qkv projection and attention, as eager code does it (the native kernel straight from the map, or
    partition, SDPA and reverse); inference only (no autograd).

    Compiled CPU inference runs it for static and symbolic image sizes alike. With symbolic sizes it
    replaces the index gathers (``window_partition_gather``), which inductor compiles into kernels that
    divide by symbolic sizes per element: davit_tiny at batch 8 compiled in 127 instead of 359 s (Zen 4 VM,
    session 27). With the norm inside, the normed map is not written whole (fused.INFER_OP_CHUNK_TOKENS)."""
    B, H, W, C = x.shape
    ws = window_size
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    step = max(1, fused.INFER_OP_CHUNK_TOKENS // (Hp * Wp))
    out = x.new_empty((B, H, W, weight.shape[0] // 3))
    for i in range(0, B, step):
        part = fused.layer_norm_rows(x[i : i + step], norm_weight, norm_bias, eps)
        if Hp != H or Wp != W:
            part = F.pad(part, (0, 0, 0, Wp - W, 0, Hp - H))
        # the projection is per token: where the native kernel runs, on the map, and the kernel attends
        # window by window straight into the output (no partition, reverse or crop copies)
        if native.window_kernel_supports(part, C, num_heads, ws):
            qkv = fused.infer_linear(part, weight, bias, compiled=True)
            native.window_attention_map(qkv, num_heads, ws, out=out[i : i + step], out_hw=(H, W))
        else:
            qkv = fused.infer_linear(window_partition(part, ws), weight, bias, compiled=True)
            out[i : i + step] = window_reverse(window_attention(qkv, num_heads), ws, Hp, Wp)[:, :H, :W]
    return out


@onednn_window_attention_map.register_fake
def _(x: Tensor, _nw: Tensor | None, _nb: Tensor | None, _eps: float, weight: Tensor, *_) -> Tensor:
    return x.new_empty((*x.shape[:3], weight.shape[0] // 3))


@torch.library.custom_op("davit::onednn_channel_attention", mutates_args=())
def onednn_channel_attention(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
    weight: Tensor,
    bias: Tensor | None,
    groups: int,
    v2: bool,
) -> Tensor:
    """``channel_attention(F.linear(layer_norm(x), weight, bias), groups, v2)`` for a channel block's tokens
    ``x`` (B, N, C), on chunks of whole images; inference only (no autograd)."""
    step = max(1, fused.INFER_OP_CHUNK_TOKENS // x.shape[1])
    out = x.new_empty((*x.shape[:2], weight.shape[0] // 3))
    for i in range(0, x.shape[0], step):
        t = fused.layer_norm_rows(x[i : i + step], norm_weight, norm_bias, eps)
        qkv = fused.infer_linear(t, weight, bias, compiled=True)
        out[i : i + step] = channel_attention(qkv, groups, v2)
    return out


@onednn_channel_attention.register_fake
def _(x: Tensor, _nw: Tensor | None, _nb: Tensor | None, _eps: float, weight: Tensor, *_) -> Tensor:
    return x.new_empty((*x.shape[:2], weight.shape[0] // 3))


class WindowAttention(nn.Module):
    """Window self-attention on (B*nW, L, C) tokens: qkv projection, attention, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fast = True  # False selects the literal reference formulation (tests, debugging)

    def attend(self, x: Tensor) -> Tensor:
        """Attention output before the output projection (blocks fuse the projection with the residual)."""
        if not self.fast:
            return window_attention_ref(self.qkv(x), self.num_heads)
        # consumer_fuses=False: attention reads q, k, v as strided views of the projection, no pass to join
        return window_attention(linear(x, self.qkv, consumer_fuses=False), self.num_heads)

    def attend_one_padded(self, x: Tensor, n_pad: int) -> Tensor:
        """:meth:`attend` for the L real tokens (B, L, C) of a map that the window covers with ``n_pad``
        padding tokens (see :func:`window_attention_one_padded`)."""
        qkv = linear(x, self.qkv, consumer_fuses=False)
        return window_attention_one_padded(qkv, self.num_heads, self.qkv.bias, n_pad)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.attend(x))


class ChannelAttention(nn.Module):
    """Channel group attention on (B, N, C) tokens; ``v2`` selects the Florence-2 formulation."""

    def __init__(self, dim: int, groups: int, qkv_bias: bool = True, v2: bool = False) -> None:
        super().__init__()
        if dim % groups:
            raise ValueError(f"dim {dim} is not divisible by groups {groups}")
        self.groups = groups
        self.v2 = v2
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fast = True

    def attend(self, x: Tensor) -> Tensor:
        """Attention output before the output projection (blocks fuse the projection with the residual)."""
        if not self.fast:
            return channel_attention_ref(self.qkv(x), self.groups, self.v2)
        # the native kernel reads q, k, v in place: a bias added apart would be a pass of its own (see linear)
        kernel = native.channel_attention_supports(x, self.groups, width=self.qkv.out_features)
        return channel_attention(linear(x, self.qkv, consumer_fuses=not kernel), self.groups, self.v2)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.attend(x))
