"""LayerNorm over the channels of (..., C) tokens, with a Triton kernel for CUDA inference.

PyTorch's CUDA layer norm launches one thread block per row, and DaViT's rows are short (C = 96 in
davit_tiny's first stage, 802 816 rows at batch 256). On an H200 the 29 layer norms of davit_tiny's
bf16-autocast forward at batch 256 took 10.7 of its 36.8 ms (timm's model: the same 10.7 ms) for ~7.5 GB of
fp32 reads and writes: ~0.7 TB/s, where a plain copy moves ~4.3 TB/s (docs/benchmarks.md, session 22).
:func:`triton_layer_norm` normalises a tile of rows per program instead, in fp32, and can write its output
directly in the autocast dtype when the norm feeds a linear or convolution that autocast would run in that
dtype anyway: that also saves the cast kernel and half the bytes written. The rounding is the one the cast
would do (round to nearest even), so results equal the plain path's up to the order of the fp32 sums.

It is used in eager CUDA inference only (no autograd, no compile, trace or export: those keep
``F.layer_norm``, which inductor fuses itself); everything else runs the plain op. Without Triton (CPU-only
installs, other platforms) the module is a plain ``nn.LayerNorm``.

**Opt-in until measured on a GPU**: the kernel is checked against ``F.layer_norm`` under Triton's CPU
interpreter and compiled for sm_90 offline (tests/layers/test_norm.py), but the device lent in session 22 was
withdrawn before it ran there,
so it is off unless ``DAVIT_TRITON_LAYERNORM=1`` or :func:`set_triton_layer_norm` turns it on. If the kernel
fails to build or launch, a warning says so and the plain op is used from then on.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .attention import _traced
from .fused import fused_cpu_inference, has_hooks

__all__ = [
    "LayerNorm",
    "set_fork_norm",
    "set_triton_layer_norm",
    "triton_available",
    "triton_layer_norm",
    "triton_layer_norm_enabled",
]

_ENABLED = os.environ.get("DAVIT_TRITON_LAYERNORM", "0") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def set_triton_layer_norm(enable: bool) -> None:
    """Turn the Triton kernel of eager CUDA inference on or off (default: ``DAVIT_TRITON_LAYERNORM=1``)."""
    global _ENABLED
    _ENABLED = bool(enable)


def triton_layer_norm_enabled() -> bool:
    """Whether eager CUDA inference may use the kernel (it also needs Triton installed)."""
    return _ENABLED and triton_available()


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ln_fwd(
        X, W, B, Y, M, N, stride_x, stride_y, eps,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)  # two passes over the registers: no cancellation
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        if Y.dtype.element_ty != tl.float32:  # to bf16/fp16, rounded as autocast's cast would (nearest even)
            y = y.to(Y.dtype.element_ty, fp_downcast_rounding="rtne")
        else:
            y = y.to(Y.dtype.element_ty)
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y, mask=mask)

    return ln_fwd, triton.next_power_of_2


def triton_layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Layer norm of the last dim of ``x`` (any leading shape) in fp32, returned in ``out_dtype`` (default
    ``x.dtype``). No autograd: callers use it where no gradient is needed."""
    kernel, next_pow2 = _kernel()
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0:
        return y.view(x.shape)
    block_n = next_pow2(N)
    # ~4096 elements per program (32 rows of 128 at C = 96): enough work per block, 32 values per thread
    block_m = max(1, min(128, 4096 // block_n))
    warps = 4 if block_n <= 1024 else 8
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton: current device
        kernel[(-(-M // block_m),)](
            x2, weight, bias, y, M, N, x2.stride(0), y.stride(0), eps,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
    return y.view(x.shape)


class _ForkNorm(torch.autograd.Function):
    """``(x, layer_norm(x))`` for eager CPU fp32 training, see :meth:`LayerNorm.fork`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        y, mean, rstd = native.layer_norm_train(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.affine = (weight is not None, bias is not None)
        # x itself: autograd hands it on as a view of x whose gradient comes to backward's first argument
        return x, y

    @staticmethod
    def backward(ctx, grad_skip: Tensor, grad: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        _, need_w, need_b, _ = ctx.needs_input_grad
        gx, gw, gb = native.layer_norm_backward(
            x, weight, mean, rstd, grad.contiguous(), grad_skip.contiguous(),
            ctx.affine[0] and need_w, ctx.affine[1] and need_b,
        )  # fmt: skip
        return gx, gw, gb, None


_FORK = True


def set_fork_norm(enable: bool) -> bool:
    """Let eager CPU fp32 training run the blocks' norms as :meth:`LayerNorm.fork` where it applies (the
    default) or as the norm and autograd's sum of the stream's two gradients (A/B timing, tests). Returns the
    previous setting."""
    global _FORK
    previous, _FORK = _FORK, bool(enable)
    return previous


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state-dict keys) that runs :func:`triton_layer_norm` in eager
    CUDA inference when :func:`triton_layer_norm_enabled`.

    ``autocast_out=True`` declares that the output only feeds ops autocast runs in its low-precision dtype
    (a linear, a convolution): under CUDA autocast the kernel then writes that dtype instead of the fp32 that
    autocast's layer norm returns. Norms whose output is a result or a residual stream keep fp32.
    ``fast=False`` (``DaViT.set_fast(False)``) selects the plain op."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, autocast_out: bool = False, **kw) -> None:
        super().__init__(normalized_shape, eps=eps, **kw)
        self.autocast_out = autocast_out
        self.fast = True

    def _kernel_ok(self, x: Tensor) -> bool:
        return (
            self.fast
            and x.is_cuda
            and self.weight is not None
            and self.bias is not None
            and len(self.normalized_shape) == 1
            and self.normalized_shape[0] <= 8192  # one row per program at most: the tile stays in registers
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and triton_layer_norm_enabled()
            and not _traced()
        )

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel_ok(x):
            if torch.is_autocast_enabled("cuda"):
                out = torch.get_autocast_dtype("cuda") if self.autocast_out else torch.float32
            else:
                out = x.dtype  # as F.layer_norm returns, also for mixed input/weight dtypes
            try:
                return triton_layer_norm(x, self.weight, self.bias, self.eps, out)
            except Exception as e:  # a Triton/driver combination it does not build on: keep working
                set_triton_layer_norm(False)
                warnings.warn(
                    f"davit: the Triton layer-norm kernel failed ({type(e).__name__}: {e}); using "
                    "F.layer_norm from now on. Unset DAVIT_TRITON_LAYERNORM to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if (
            self.fast
            and len(self.normalized_shape) == 1
            and fused_cpu_inference(x)
            and native.layer_norm_supports(x, self.weight, self.bias)
        ):
            return native.layer_norm(x, self.weight, self.bias, self.eps)  # eager CPU fp32 inference
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def fork(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, self(x))`` for a residual block, ``x`` the stream that the block's branch is added to. In
        eager CPU fp32 training, one autograd function with the native kernels: the norm's forward, and a
        backward that adds the stream's gradient from the skip to the norm's input gradient in the same pass
        (torch's norm backward, then autograd's sum of the two, are two passes over the stream). Elsewhere
        (other devices and dtypes, inference, compiled code, tracing, hooks, ``fast=False``) the plain
        pair."""
        w, b = self.weight, self.bias
        if (
            _FORK
            and self.fast
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and native._operator_context()
            and len(self.normalized_shape) == 1
            and self.normalized_shape[0] == x.shape[-1]
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.is_contiguous()
            and x.shape[-1] % 16 == 0
            and x.shape[-1] > 0
            and all(p is None or (p.dtype == torch.float32 and p.is_contiguous()) for p in (w, b))
            and not has_hooks(self)
            and native.native_library() is not None
        ):
            return _ForkNorm.apply(x, self.weight, self.bias, self.eps)
        return x, self(x)
