"""DaViT building blocks on channels-last token maps (B, H, W, C).

Keeping tokens as (B, H, W, C) between blocks means LayerNorm and the linear layers run on contiguous rows,
and the depthwise position-encoding conv sees a channels-last NCHW *view* (oneDNN's channels-last kernel), so
no permute copies are needed between blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .attention import (
    ChannelAttention,
    WindowAttention,
    _traced,
    known_true,
    onednn_channel_attention,
    onednn_window_attention_map,
    symbolic_sizes,
    window_partition,
    window_partition_gather,
    window_reverse,
    window_reverse_gather,
)
from .fused import (
    compiled_cpu_fp32_training,
    conv,
    fused_compiled_inference,
    fused_cpu_inference,
    has_hooks,
    infer_linear,
    infer_linear_add,
    linear,
    native_bias_gelu,
    onednn_linear,
    onednn_linear_add,
    onednn_linear_gelu,
    onednn_norm_mlp_add,
    onednn_training,
    plain_train_mlp,
    train_mlp,
    train_mlp_applies,
)
from .native import window_attention as native_window_attention
from .native import window_attention_map, window_kernel_supports, window_training_supports
from .norm import LayerNorm

__all__ = [
    "DropPath",
    "ConvPosEnc",
    "Mlp",
    "SpatialBlock",
    "ChannelBlock",
    "drop_path",
    "linear_residual",
    "set_compiled_mlp_chunks",
]


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p``, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


def _tap_index(H: int, W: int) -> list[int]:
    """Per output pixel p, input pixel q of an H x W map (row-major), the 3x3 tap joining them, 9 if none."""
    idx = []
    for pi in range(H):
        for pj in range(W):
            for qi in range(H):
                for qj in range(W):
                    # conv2d is a correlation: out[p] += w[d] * x[p + d - 1]
                    di, dj = qi - pi + 1, qj - pj + 1
                    idx.append(3 * di + dj if 0 <= di < 3 and 0 <= dj < 3 else 9)
    return idx


def _depthwise3x3_tiny(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise 3x3 conv (padding 1) of a (B, H, W, C) map with P = H * W <= 4 pixels, as one product.

    On such a map the conv is a per-channel P x P linear map: gather the taps into K[p, q, c] (zero where q is
    out of p's reach) and sum x[q, c] * K[p, q, c] over q. One multiply and one sum, forward and backward,
    instead of oneDNN's depthwise conv, whose backward costs ~15 ms on a (128, 256, 1, 1) map. K is gathered
    contiguous on purpose: a broadcast multiply by a strided per-channel row (a column of the (C, 9) weight)
    runs ~25x slower on CPU than by a contiguous one (0.45 ms vs 0.02 ms on a (64, 2, 2, 128) map), which made
    the previous shifted-copies formulation 30% of a Fashion-MNIST demo training step.
    """
    B, H, W, C = x.shape
    P = H * W
    taps = torch.cat([weight.reshape(C, 9), weight.new_zeros(C, 1)], 1).t()  # (10, C); row 9: no tap
    k = taps[torch.tensor(_tap_index(H, W), device=weight.device)].reshape(P, P, C)
    out = (x.reshape(B, 1, P, C) * k).sum(2).reshape(B, H, W, C)
    return out if bias is None else out + bias


class ConvPosEnc(nn.Module):
    """Conditional position encoding: x + DepthwiseConv3x3(x)."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
        self.fast = True

    def forward(self, x: Tensor) -> Tensor:  # x: (B, H, W, C)
        proj = self.proj
        if (
            self.fast
            and proj.kernel_size == (3, 3)
            and proj.stride == (1, 1)
            and proj.padding == (1, 1)
            and proj.dilation == (1, 1)
            and proj.padding_mode == "zeros"
            and not has_hooks(proj)
            and native.pos_enc_supports(x, proj.weight, proj.bias)
        ):
            # CPU fp32: the native kernel, forward and backward one pass each (see native.pos_enc)
            return native.pos_enc(x, proj.weight, proj.bias)
        # known_true: a graph with symbolic sizes keeps the conv instead of guarding on the size
        tiny = self.proj.kernel_size == (3, 3) and known_true(x.shape[1] * x.shape[2] <= 4)
        if tiny and self.fast and not has_hooks(self.proj):
            return x + _depthwise3x3_tiny(x, self.proj.weight, self.proj.bias)
        # permute gives an NCHW view with channels-last strides; conv2d keeps that format, so the result
        # permutes back to a contiguous (B, H, W, C) tensor for free
        y = conv(x.permute(0, 3, 1, 2), self.proj, self.fast).permute(0, 2, 3, 1)
        if self.fast and fused_cpu_inference(x) and not has_hooks(self.proj):
            # eager CPU inference: the sum into the conv's fresh output, not a third map (bit-identical);
            # davit_tiny's forward at batch 16 1.008-1.038x as fast (four paired A/Bs of 9 interleaved
            # rounds, glibc's defaults and malloc tuned, Intel VM, session 30)
            return y.add_(x)
        return x + y


def _fork(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, norm(x))`` for a residual block whose branch starts with ``norm``: ours through
    :meth:`LayerNorm.fork` (x itself; in eager CPU training the skip's gradient then joins the norm's
    backward), any other norm module called plainly."""
    return norm.fork(x) if isinstance(norm, LayerNorm) else (x, norm(x))


def linear_residual(
    x: Tensor, layer: nn.Linear, residual: Tensor, drop: DropPath, fast: bool = True
) -> Tensor:
    """residual + drop(layer(x)); on CPU inference one oneDNN kernel does the matmul, bias and add
    (bit-identical, ~30% faster than linear then add: one pass over the output instead of three), or on Intel
    AVX-512 CPUs MKL's GEMM and an in-place add (davit.layers.fused.infer_linear_add)."""
    if fast and (drop.p == 0.0 or not drop.training):
        if fused_cpu_inference(x):
            return infer_linear_add(x, residual, layer.weight, layer.bias)
        if fused_compiled_inference(x, layer):
            return onednn_linear_add(x, residual, layer.weight, layer.bias)
    return residual + drop(linear(x, layer, fast))


def _norm_folds(norm: nn.Module, x: Tensor, layer: nn.Linear) -> bool:
    """True where compiled CPU inference runs the layer norm ``norm`` of ``x`` inside the chunked op of the
    ``layer`` it feeds (the MLP's fc1, an attention's qkv; see davit.layers.fused.INFER_OP_CHUNK_TOKENS): the
    normed map is then never written whole. Not where the norm is hooked or set to its reference path."""
    return (
        isinstance(norm, nn.LayerNorm)
        and len(norm.normalized_shape) == 1
        and getattr(norm, "fast", True)
        and not has_hooks(norm)
        and fused_compiled_inference(x, layer)
    )


#: Eager CPU training runs a block's MLP on chunks of this many tokens where its hidden map is larger than two
#: chunks (davit_tiny at 224 px, batch 8: the first stage's 25088 tokens in 4 chunks). Whole, that hidden map
#: is 38.5 MB, and fc1's output, GELU's output and their two gradients are each allocated above glibc's
#: largest mmap threshold (32 MiB): mapped fresh and faulted in every step. In chunks they come from the heap,
#: and GELU and its backward read their input from cache. The same activations are kept for the backward.
TRAIN_MLP_CHUNK_TOKENS = 6272

#: Compiled CPU training splits the same MLPs into a fixed number of chunks: the batch size is symbolic there
#: (a count that depends on it would guard on it, and another batch size would recompile), so the count is
#: what eager training's rule gives at this batch size, from the map's static tokens per image (davit_tiny at
#: 224 px: 4 chunks in the first stage, whole maps in the others; 6272 tokens per chunk at batch 8). Paired
#: rounds of the compiled step at batch 8, Zen 4 (session 39): 1.035x as committed (15 rounds; exploratory,
#: 11 rounds each: 1.059x with 4 chunks, 1.023x with 2, 1.008x with 8, and no gain from the second stage in
#: 2); the step's peak allocation 873 MB against 860 MB with whole maps (timm's 874 MB).
COMPILED_TRAIN_MLP_BATCH = 8

# davit.layers.blocks.set_compiled_mlp_chunks(False): compiled training keeps whole maps (A/B timing, tests)
_COMPILED_CHUNKS = True


def set_compiled_mlp_chunks(enable: bool) -> bool:
    """Let compiled CPU fp32 training run large MLPs on chunks of tokens (the default; see
    :data:`COMPILED_TRAIN_MLP_BATCH`) or on whole maps. Read when torch.compile traces. Returns the previous
    setting."""
    global _COMPILED_CHUNKS
    previous, _COMPILED_CHUNKS = _COMPILED_CHUNKS, bool(enable)
    return previous


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear.

    On CPU in inference, fc1 and GELU run as one oneDNN kernel (bit-identical to the two-op path and ~30%
    faster, see PERF_NOTES.md; on Intel AVX-512 CPUs MKL's GEMM and an in-place GELU instead, see
    davit.layers.fused.infer_linear); :meth:`hidden` exposes the activation so blocks can fuse fc2 with the
    residual add.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.fast = True

    def hidden(self, x: Tensor) -> Tensor:
        if self.fast and fused_cpu_inference(x):
            return infer_linear(x, self.fc1.weight, self.fc1.bias, "gelu")
        if self.fast and fused_compiled_inference(x, self.fc1):
            return onednn_linear_gelu(x, self.fc1.weight, self.fc1.bias)
        if (
            self.fast
            and not has_hooks(self.act)
            and type(self.act) is nn.GELU
            and self.act.approximate == "none"
            and native_bias_gelu(x, self.fc1)
        ):
            # CPU fp32 training (compiled; eager after oneDNN's linears): the GEMM without its bias, bias +
            # GELU (and in the backward GELU's gradient and the bias gradient) in one native pass each
            if onednn_training(x, self.fc1):
                a = onednn_linear(x, self.fc1.weight, None)
            else:
                a = F.linear(x, self.fc1.weight)
            return native.bias_gelu(a, self.fc1.bias)
        return self.act(linear(x, self.fc1, self.fast))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden(x))

    def add_to(self, residual: Tensor, norm: nn.Module, drop: DropPath) -> Tensor:
        """``residual + drop(self(norm(residual)))``, the blocks' norm and MLP branch. CPU inference fuses
        fc2 with the add (see :func:`linear_residual`), compiled CPU inference runs the norm and the whole
        branch as one opaque call on chunks of tokens (:func:`~davit.layers.fused.onednn_norm_mlp_add`);
        eager CPU fp32 training runs the MLP on chunks of TRAIN_MLP_CHUNK_TOKENS tokens where the hidden map
        is larger than two chunks (see there), compiled CPU fp32 training on the fixed number of chunks of
        :meth:`_compiled_chunks`; in CPU fp32 training each (chunk of the) MLP is one function where
        :func:`~davit.layers.fused.train_mlp_applies`, and in eager training the norm is
        :meth:`LayerNorm.fork`."""
        if (
            self.fast
            and (drop.p == 0.0 or not drop.training)
            and _norm_folds(norm, residual, self.fc1)
            and not has_hooks(self.act)
            and not has_hooks(self.fc2)
        ):
            # compiled CPU inference: the norm and the whole branch as one opaque call on chunks of tokens
            fc1, fc2 = self.fc1, self.fc2
            return onednn_norm_mlp_add(
                residual, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias
            )
        residual, x = _fork(norm, residual)
        n = x.numel() // x.shape[-1]  # (torch.Size.numel() would make a symbolic size concrete under export)
        chunks = self._compiled_chunks(x, residual)
        if chunks > 1:  # compiled training: a count that does not depend on the symbolic batch size
            parts = x.reshape(n, x.shape[-1]).tensor_split(chunks)
        elif not (
            self.fast
            and x.is_cpu
            and x.dtype == torch.float32  # measured in fp32 only (bf16 autocast keeps the whole map)
            and not torch.is_autocast_enabled("cpu")
            and torch.is_grad_enabled()
            # before the size test: under torch.compile that test on symbolic sizes would become a guard,
            # and a batch size on its other side a recompile
            and not _traced()
            and not torch.jit.is_scripting()
            and n >= 2 * TRAIN_MLP_CHUNK_TOKENS
            and not any(has_hooks(m) for m in (self, self.fc1, self.act, self.fc2))
        ):
            return self._add_branch(x, residual, drop)
        else:
            parts = x.reshape(n, x.shape[-1]).split(TRAIN_MLP_CHUNK_TOKENS)
        # split and cat, not slicing and slice assignment: their backwards are one cat of the chunks' input
        # gradients and free views of y's, where a slice's backward writes a zero-filled full-size gradient
        # per chunk (summed by autograd) and a slice assignment's clones y's (13.5 ms of fills, copies and
        # adds per davit_tiny training step at batch 8, session 37)
        y = torch.cat([self._branch(part) for part in parts])
        return residual + drop(y.view(residual.shape))

    def _fused_train(self, x: Tensor) -> bool:
        return self.fast and not has_hooks(self) and train_mlp_applies(x, self.fc1, self.act, self.fc2)

    def _branch(self, x: Tensor) -> Tensor:
        """``self(x)`` on the training paths: CPU fp32 training as one function
        (:func:`~davit.layers.fused.train_mlp`; compiled, one opaque op), else the hidden map and fc2 as in
        :meth:`hidden`."""
        if self._fused_train(x):
            return train_mlp(x, self.fc1, self.fc2)
        return linear(self.hidden(x), self.fc2, self.fast)

    def _add_branch(self, x: Tensor, residual: Tensor, drop: DropPath) -> Tensor:
        # residual + drop(self(x)) on a whole map
        if self._fused_train(x):
            return residual + drop(train_mlp(x, self.fc1, self.fc2))
        return linear_residual(self.hidden(x), self.fc2, residual, drop, self.fast)

    def _compiled_chunks(self, x: Tensor, residual: Tensor) -> int:
        """How many chunks of tokens compiled CPU fp32 training runs this MLP on (1: the whole map): see
        :data:`COMPILED_TRAIN_MLP_BATCH`. Only where the tokens per image are static (a symbolic image size
        keeps whole maps), and where each chunk is one opaque MLP op: with oneDNN's training linears
        (:func:`~davit.layers.fused.onednn_training`) or the MLP function on ``F.linear``'s GEMMs
        (:func:`~davit.layers.fused.plain_train_mlp`, AVX2-only CPUs). On such a CPU emulated on the Zen 4 VM
        the chunks made the compiled step 1.030x as fast (session 48, the three ops) and 1.054x (session 49,
        the MLP function) but raised its peak above timm's (1205 and 1199 MB against 1198), so they were
        off there; with the downsampling on patches there (``davit.models.default_patch_linear_side``) the
        step's peak is 850.0 MiB with whole maps, 861.6 MiB in chunks against timm's 873.1, and the chunks
        1.042x as fast (13 paired rounds, quartiles 1.016-1.067; session 50)."""
        if not (
            _COMPILED_CHUNKS
            and self.fast
            and compiled_cpu_fp32_training(x, self.fc1)
            and (onednn_training(x, self.fc1) or plain_train_mlp(x, self.fc1))
            and not any(has_hooks(m) for m in (self, self.act, self.fc2))
        ):
            return 1
        tokens = 1
        for size in residual.shape[1:-1]:
            tokens *= size
        chunks = tokens * COMPILED_TRAIN_MLP_BATCH // TRAIN_MLP_CHUNK_TOKENS
        # decided without a guard: dynamo presents symbolic sizes as ints (an isinstance test let them through
        # before session 52), and a plain `chunks >= 2` on them guards the graph, so an image size on the
        # guard's other side recompiled it (a 3-stage model's training graph at 2 x 107 x 186, then
        # 2 x 199 x 216: ~270 s each on the Zen 4 VM). Unknown for every size: the whole map
        return chunks if known_true(chunks >= 2) else 1


class SpatialBlock(nn.Module):
    """CPE -> LN -> window attention (+res) -> CPE -> LN -> MLP (+res)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.cpe1 = ConvPosEnc(dim)
        self.norm1 = LayerNorm(dim, eps=norm_eps, autocast_out=True)
        self.attn = WindowAttention(dim, num_heads, qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.cpe2 = ConvPosEnc(dim)
        self.norm2 = LayerNorm(dim, eps=norm_eps, autocast_out=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        x = self.cpe1(x)
        if torch.is_grad_enabled():
            # training: project inside the windows, on the attention kernel's output that autograd keeps
            # anyway; projecting after un-windowing would keep a second, re-laid-out copy of it for the
            # projection's backward (+20 MB, 2% of the activations, for davit_tiny at batch 8, 224 px)
            s, t = _fork(self.norm1, x)
            x = s + self.drop_path1(self._window_attend(t, self.attn.proj))
        else:
            # the output projection is per token, so it runs after un-windowing, fused with the residual add
            if self._map_attention(x):
                n, qkv = self.norm1, self.attn.qkv
                ws, heads = self.window_size, self.attn.num_heads
                t = onednn_window_attention_map(x, n.weight, n.bias, n.eps, qkv.weight, qkv.bias, heads, ws)
            else:
                t = self._window_attend(self.norm1(x))
            x = linear_residual(t, self.attn.proj, x, self.drop_path1, self.attn.fast)
        x = self.cpe2(x)
        return self.mlp.add_to(x, self.norm2, self.drop_path2)

    def attention_qkv(self, x: Tensor) -> Tensor:
        """The qkv projection this block's window attention sees for input ``x`` (B, H, W, C), in the literal
        form: the normed map zero-padded to whole windows, windowed -> (B * nW, ws * ws, 3C). For inspection
        (davit.viz); the forward may compute it in a cheaper, equivalent way."""
        t = self.norm1(self.cpe1(x))
        H, W, ws = t.shape[1], t.shape[2], self.window_size
        t = F.pad(t, (0, 0, 0, (-W) % ws, 0, (-H) % ws))
        return self.attn.qkv(window_partition(t, ws))

    def _map_attention(self, x: Tensor) -> bool:
        """Whether compiled CPU inference runs this block's norm and window attention on ``x`` (B, H, W, C) as
        one opaque op on whole images (:func:`~davit.layers.attention.onednn_window_attention_map`): for
        symbolic and static image sizes, except a static map smaller than one window that needs padding
        (the cheaper :meth:`WindowAttention.attend_one_padded` path below)."""
        if not (self.attn.fast and _norm_folds(self.norm1, x, self.attn.qkv)):
            return False
        H, W = x.shape[1], x.shape[2]
        return symbolic_sizes(H, W) or not self._one_padded_window(H, W)

    def _one_padded_window(self, H: int, W: int) -> bool:
        """Whether an H x W map is smaller than one window and needs padding: then it is attended as that one
        window without materialising the padding (:meth:`WindowAttention.attend_one_padded`)."""
        ws = self.window_size
        pad_b, pad_r = (H + ws - 1) // ws * ws - H, (W + ws - 1) // ws * ws - W
        return bool(pad_b or pad_r) and H <= ws and W <= ws

    def _window_attend(self, t: Tensor, proj: nn.Linear | None = None) -> Tensor:
        """Window attention of the normed map (B, H, W, C), before the output projection, or after ``proj``
        applied inside the windows."""
        B, H, W, C = t.shape
        ws = self.window_size
        if symbolic_sizes(H, W):
            # torch.compile with symbolic sizes: pad, partition, reverse and crop as two gathers, without a
            # branch on the size (one graph for every image size; see window_partition_gather)
            t = self.attn.attend(window_partition_gather(t, ws))
            if proj is not None:
                t = linear(t, proj, self.attn.fast)
            return window_reverse_gather(t, ws, B, H, W)
        # whole windows per side as a ceiling division (a graph whose sizes are symbolic but of fixed parity
        # still comes here; this form keeps its size expressions short, where H + (-H) % ws nests a modulo)
        nh, nw = (H + ws - 1) // ws, (W + ws - 1) // ws
        Hp, Wp = nh * ws, nw * ws
        pad_b, pad_r = Hp - H, Wp - W
        if self.attn.fast and self._one_padded_window(H, W):
            # the map is smaller than one window: attend without materialising the padding (same result)
            t = self.attn.attend_one_padded(t.reshape(B, H * W, C), ws * ws - H * W)
            return (t if proj is None else linear(t, proj, self.attn.fast)).view(B, H, W, C)
        if pad_b or pad_r:
            # zero tokens appended AFTER the norm take part as keys (they carry the qkv bias),
            # as in the release
            t = F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
        heads = self.attn.num_heads
        if (
            proj is None
            and self.attn.fast
            and fused_cpu_inference(t)
            and not has_hooks(self.attn.qkv)
            and window_kernel_supports(t, C, heads, ws)
        ):
            # eager CPU inference: the projection is per token, so it runs on the map, and the native
            # kernel attends window by window straight into the (cropped) output map
            return window_attention_map(linear(t, self.attn.qkv), heads, ws, out_hw=(H, W))
        if (
            torch.is_grad_enabled()
            and self.attn.fast
            and not has_hooks(self.attn.qkv)
            and window_training_supports(t, C, heads, ws)
        ):
            # CPU fp32 training: the same map-layout kernel, with its backward writing the qkv gradient
            # straight into the projection's layout (no partition, reverse, stack or re-layout copies).
            # Forward + backward per call 1.1-2.2x torch's windowed SDPA path (davit_tiny's stages, batch 8)
            qkv = linear(t, self.attn.qkv, self.attn.fast, consumer_fuses=False)
            t = native_window_attention(qkv, heads, ws, H, W)
            return t if proj is None else linear(t, proj, self.attn.fast)
        t = self.attn.attend(window_partition(t, ws))  # (B*nW, ws*ws, C)
        if proj is not None:
            t = linear(t, proj, self.attn.fast)
        t = window_reverse(t, ws, Hp, Wp)
        if pad_b or pad_r:
            t = t[:, :H, :W, :]
            if proj is None:
                t = t.contiguous()  # the fused projection + residual kernel wants a dense input
        return t


class ChannelBlock(nn.Module):
    """CPE -> LN -> channel group attention over the whole map (+res) -> CPE -> LN -> MLP (+res)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        v2: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.cpe1 = ConvPosEnc(dim)
        self.norm1 = LayerNorm(dim, eps=norm_eps, autocast_out=True)
        self.attn = ChannelAttention(dim, num_heads, qkv_bias, v2=v2)
        self.drop_path1 = DropPath(drop_path)
        self.cpe2 = ConvPosEnc(dim)
        self.norm2 = LayerNorm(dim, eps=norm_eps, autocast_out=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def attention_qkv(self, x: Tensor) -> Tensor:
        """The qkv projection this block's channel attention sees for input ``x`` (B, H, W, C):
        (B, H*W, 3C)."""
        t = self.norm1(self.cpe1(x))
        return self.attn.qkv(t.reshape(t.shape[0], -1, t.shape[-1]))

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        x = self.cpe1(x)
        B, H, W, C = x.shape
        a, n = self.attn, self.norm1
        if a.fast and _norm_folds(n, x, a.qkv):
            # compiled CPU inference: the norm, qkv and attention as one opaque op on chunks of images
            t = x.reshape(B, H * W, C)
            t = onednn_channel_attention(t, n.weight, n.bias, n.eps, a.qkv.weight, a.qkv.bias, a.groups, a.v2)
        else:
            x, t = _fork(n, x)
            t = a.attend(t.reshape(B, H * W, C))
        t = t.view(B, H, W, C)
        x = linear_residual(t, self.attn.proj, x, self.drop_path1, self.attn.fast)
        x = self.cpe2(x)
        return self.mlp.add_to(x, self.norm2, self.drop_path2)
