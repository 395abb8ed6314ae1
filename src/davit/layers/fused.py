"""Guarded oneDNN kernels for CPU fp32 inference.

``torch.ops.mkldnn._linear_pointwise`` runs a linear layer with its bias and an optional epilogue (exact GELU,
or an elementwise add of a residual) in one pass over the output. On the 2-core AVX2 machines of PERF_NOTES.md
it is also faster than ``F.linear`` for the plain linear: ``addmm`` first copies the bias into every output
row (an extra full pass over a fresh, page-faulting buffer), and for some shapes (stage-1 qkv,
50176 x 96 -> 288) MKL's path for a transposed weight runs at half speed. Results are bit-identical to the
plain ops on the shapes we test.

They are private operators, so every use is behind :func:`fused_cpu_inference` and the plain path stays for
training, other dtypes and devices, tracing, export and ``torch.compile`` (which does its own fusion).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["fused_cpu_inference", "has_hooks", "linear"]


def _mkldnn_fusions_available() -> bool:
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


_MKLDNN = _mkldnn_fusions_available()


def fused_cpu_inference(x: Tensor) -> bool:
    """True where the oneDNN fused kernels may replace the plain ops: CPU fp32 inference in eager mode."""
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


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks; fused paths that bypass its ``forward`` must not be taken
    then (davit.viz records attention through a hook on each ``attn.qkv``)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def linear(x: Tensor, layer: nn.Linear, fast: bool = True) -> Tensor:
    """``layer(x)``, through oneDNN in CPU fp32 inference (unless the layer is hooked)."""
    if fast and fused_cpu_inference(x) and not has_hooks(layer):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    return layer(x)  # the module call, so hooks on it still fire
