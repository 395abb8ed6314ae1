"""Native CPU kernels (``davit/csrc``), compiled on first use with the machine's C++ compiler and cached.

For CPU fp32: window self-attention (:func:`window_attention_map`), read from the map's qkv projection and
written into the output map, so the windows are never partitioned or reversed as copies, in inference and,
with its backward (:func:`window_attention_map_backward`, as the differentiable operator
:func:`window_attention`), in training; the conditional position encoding ``x + depthwise_conv3x3(x)`` of a
(B, H, W, C) map, forward and backward (the operator :func:`pos_enc`); in training exact GELU with the
preceding linear's bias, forward and backward (the operator :func:`bias_gelu`) and channel group attention,
forward and backward (the operator :func:`channel_attention`), and linears' weight and bias gradients
(:func:`linear_weight_grad`); and in inference layer norm over rows (:func:`layer_norm`). The library has
a plain C ABI and no torch headers: it builds in about a second, does not depend on torch's version, and is
loaded with ctypes. Its threads are OpenMP's, as many as torch's.

The library is built for the CPU it runs on (``-march=native``; ``DAVIT_NATIVE_MARCH`` names another target)
into ``$DAVIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/davit`` or ``~/.cache/davit``), under a name hashed from
the source, the compiler, its flags and the CPU's model and flags, so one cache can serve machines of several
kinds. Where there is no
compiler, the build fails or the library cannot be loaded, a warning says why once and the model runs the
portable path (torch's fused attention and layer norm), with the same results to fp32 round-off.

By default the kernels run where the library is built for AVX-512 or AVX2 with FMA
(:func:`default_native_kernels`), where they were measured faster than torch's ops; on other targets (SSE
only, non-x86) they are unmeasured and off. ``DAVIT_NATIVE_KERNELS=1`` runs them on any CPU, ``0`` turns them
off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "native_kernels_enabled",
    "set_native_kernels",
    "native_library",
    "window_attention",
    "window_attention_map",
    "window_attention_map_backward",
    "window_kernel_supports",
    "window_training_supports",
    "layer_norm",
    "layer_norm_supports",
    "layer_norm_train",
    "layer_norm_backward",
    "pos_enc",
    "pos_enc_supports",
    "bias_gelu",
    "bias_gelu_supports",
    "bias_gelu_with_grad_",
    "linear_weight_grad",
    "linear_weight_grad_supports",
    "set_weight_grad_kernel",
    "set_pos_enc_kernel",
    "build_error",
]

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_kernels.cpp"
_ABI = 9
# -march: the CPU it runs on, unless DAVIT_NATIVE_MARCH names another target (a fleet's oldest CPU; an
# AVX2 build checked on an AVX-512 machine)
_FLAGS = ["-O3", f"-march={os.environ.get('DAVIT_NATIVE_MARCH') or 'native'}", "-fopenmp", "-shared", "-fPIC"]
_FLAGS.append("-std=c++17")
#: head dims the library is built for (davit's variants all have 32)
HEAD_DIMS = (16, 32, 64, 128)
#: the most tokens per window the kernel is used for: DaViT's 7 x 7 windows (1.5-2.0x torch's partition,
#: fused attention, reverse and crop per call) and the Florence-2 tower's 12 x 12 (1.09-1.48x, its forward at
#: 768 px 1.12x; docs/benchmarks.md, session 36). The library takes up to 256.
MAX_WINDOW_TOKENS = 144

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_error: str | None = None
_enabled: bool | None = None
_explicit = False  # set by set_native_kernels (not the environment or the default)


def _env_enabled() -> bool | None:
    from .fused import _env_switch  # here: fused imports this module

    return _env_switch("DAVIT_NATIVE_KERNELS", on="native CPU kernels", off="torch's ops only")


def native_kernels_enabled() -> bool:
    """Whether the native kernels may run: :func:`set_native_kernels`, else ``DAVIT_NATIVE_KERNELS`` (1 or
    0), else :func:`default_native_kernels`."""
    global _enabled
    if _enabled is None:
        env = _env_enabled()
        _enabled = default_native_kernels() if env is None else env
    return _enabled


def default_native_kernels() -> bool:
    """Whether the native kernels run by default: where the library builds and loads, built for AVX-512 or
    for AVX2 with FMA (``davit_native_vector_bits`` 512 or 256).

    On an AVX2-only CPU emulated on the 2-core Zen 4 VM (the library built with ``-march=haswell``, torch's
    own kernels held to AVX2 by ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
    MKL_ENABLE_INSTRUCTIONS=AVX2``, session 48), davit_tiny's eager steps with the kernels against torch's
    ops: inference at batch 16 1.047x, training at batch 8 1.069x (paired rounds). Elsewhere (SSE only,
    non-x86) the kernels are unmeasured. Asks for the library (built on first use), so a machine that cannot
    build it warns once here."""
    lib = _loaded_library()
    return lib is not None and lib.davit_native_vector_bits() >= 256


def native_kernels_reason() -> str:
    """Why the native kernels are off, in a few words (for ``davit bench``'s report); "" where they run."""
    if native_library() is not None:
        return ""
    if not native_kernels_enabled():
        if _explicit or _env_enabled() is False:
            return "turned off"
        if _loaded_library() is not None:
            return "built for neither AVX-512 nor AVX2 (unmeasured there); DAVIT_NATIVE_KERNELS=1 runs them"
    return f"not available: {_error or 'no reason given'}"


def set_native_kernels(enabled: bool | None) -> None:
    """Allow (``True``) or forbid (``False``) the native kernels in this process; ``None``: the environment's
    setting or the default again. Read when the model runs: no recompilation."""
    global _enabled, _explicit
    _enabled = None if enabled is None else bool(enabled)
    _explicit = enabled is not None


def build_error() -> str | None:
    """Why the library is not available (``None`` if it loaded or was not needed yet)."""
    return _error


def _cache_dir() -> Path:
    root = os.environ.get("DAVIT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "davit"


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (what ``-march=native`` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [
        line
        for line in text.splitlines()
        if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")
    ]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _build(target: Path, compiler: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as e:
        raise RuntimeError(
            f"cannot write the kernel cache {target.parent} ({e}); set DAVIT_CACHE_DIR to a writable folder"
        ) from e
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, "-o", tmp, str(_SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders (test workers) each install a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C++ compiler {compiler!r} does not run: {e}") from e
    parts = [_SOURCE.read_text(), compiler, version, " ".join(_FLAGS), platform.machine(), _cpu_identity()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if not target.exists():
        _build(target, compiler)
    lib = ctypes.CDLL(str(target))
    if lib.davit_native_abi() != _ABI:
        raise RuntimeError(f"{target} has ABI {lib.davit_native_abi()}, not {_ABI}: delete it to rebuild")
    fn = lib.davit_window_attention_f32
    i64 = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64, i64, i64, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.davit_window_attention_backward_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [i64] * 8 + [ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.davit_layer_norm_f32
    fn.argtypes = [ctypes.c_void_p] * 6 + [i64, i64, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.davit_layer_norm_backward_f32
    fn.argtypes = [ctypes.c_void_p] * 9 + [i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.davit_pos_enc_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [i64] * 4 + [ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.davit_pos_enc_backward_f32
    fn.argtypes = [ctypes.c_void_p] * 6 + [i64] * 4 + [ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.davit_bias_gelu_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.davit_bias_gelu_backward_f32
    fn.argtypes = [ctypes.c_void_p] * 5 + [i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    i32 = ctypes.c_int
    fn = lib.davit_channel_attention_f32
    fn.argtypes = [ctypes.c_void_p] * 3 + [i64] * 4 + [i32] * 3 + [ctypes.c_float, i32]
    fn.restype = ctypes.c_int
    fn = lib.davit_channel_attention_backward_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [i64] * 4 + [i32] * 3 + [ctypes.c_float, i32]
    fn.restype = ctypes.c_int
    fn = lib.davit_linear_weight_grad_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [i64] * 3 + [i32]
    fn.restype = ctypes.c_int
    lib.davit_linear_weight_grad_fast.restype = ctypes.c_int
    lib.davit_native_vector_bits.restype = ctypes.c_int
    return lib


def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, built first if needed; ``None`` where the kernels are off
    (:func:`native_kernels_enabled`) or it cannot be built or loaded (with one warning saying why)."""
    if not native_kernels_enabled():
        return None
    return _loaded_library()


def _loaded_library() -> ctypes.CDLL | None:
    # the library, built and loaded once per process whether or not the kernels are on; None (with one
    # warning) where that failed
    global _library, _tried, _error
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                _error = str(e)
                warnings.warn(
                    f"davit's native CPU kernels are not available ({_error}); running torch's ops instead "
                    "(same results to fp32 round-off, slower). DAVIT_NATIVE_KERNELS=0 silences this.",
                    stacklevel=2,
                )
            _tried = True
    return _library


def _required_library() -> ctypes.CDLL:
    """:func:`native_library`, or a RuntimeError saying why it is not there (for the direct kernel calls)."""
    lib = native_library()
    if lib is None:
        raise RuntimeError(f"davit's native CPU kernels are off: {native_kernels_reason()}")
    return lib


def window_kernel_supports(x: Tensor, channels: int, num_heads: int, window_size: int) -> bool:
    """Whether :func:`window_attention_map` runs for a map ``x`` of ``channels`` channels (the normed map, or
    its qkv projection) in inference: CPU fp32 without autograd (training: :func:`window_training_supports`),
    a built head dim (:data:`HEAD_DIMS`), at most :data:`MAX_WINDOW_TOKENS` tokens per window, and the
    library available."""
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (x.requires_grad and torch.is_grad_enabled())
        and channels % num_heads == 0
        and channels // num_heads in HEAD_DIMS
        and window_size * window_size <= MAX_WINDOW_TOKENS
    ):
        return False
    return native_library() is not None


def _check_qkv_map(name: str, qkv: Tensor, num_heads: int, window_size: int) -> None:
    if qkv.dim() != 4 or qkv.dtype != torch.float32 or qkv.device.type != "cpu" or not qkv.is_contiguous():
        raise ValueError(
            f"{name}: qkv must be a contiguous CPU fp32 (B, Hp, Wp, 3C) map, got "
            f"{qkv.dtype} {tuple(qkv.shape)} on {qkv.device} (contiguous: {qkv.is_contiguous()})"
        )
    Hp, Wp, C3 = qkv.shape[1:]
    if C3 % (3 * num_heads) or (C3 // 3 // num_heads) not in HEAD_DIMS or not 0 < window_size**2 <= 256:
        raise ValueError(
            f"{name}: {num_heads} heads of {C3 // 3} channels, window {window_size}: "
            f"head dims {HEAD_DIMS} and at most 256 tokens per window are built"
        )
    if Hp % window_size or Wp % window_size:
        raise ValueError(f"{name}: the qkv map {Hp}x{Wp} must be whole {window_size}x{window_size} windows")


def window_attention_map(
    qkv: Tensor,
    num_heads: int,
    window_size: int,
    out: Tensor | None = None,
    out_hw: tuple[int, int] | None = None,
) -> Tensor:
    """Attention inside each ``window_size`` x ``window_size`` window of the qkv map ``qkv`` (B, Hp, Wp, 3C),
    written to ``out`` (B, H, W, C) (new where ``None``; ``H, W = out_hw``, default the whole map): the
    windows' tokens beyond H, W are padding, keys and values but no outputs. Requires
    :func:`window_kernel_supports`; softmax(q k^T / sqrt(d)) v per window and head, as
    :func:`davit.layers.attention.window_attention` on the partitioned map, to fp32 round-off."""
    lib = _required_library()
    _check_qkv_map("window_attention_map", qkv, num_heads, window_size)
    B, Hp, Wp, C3 = qkv.shape
    C = C3 // 3
    H, W = (Hp, Wp) if out_hw is None else out_hw
    if not (0 < H <= Hp and 0 < W <= Wp):
        raise ValueError(f"window_attention_map: the qkv map {Hp}x{Wp} must cover the {H}x{W} output")
    if out is None:
        out = qkv.new_empty((B, H, W, C))
    elif out.shape != (B, H, W, C) or not out.is_contiguous() or out.dtype != torch.float32:
        raise ValueError(f"window_attention_map: out must be contiguous fp32 {(B, H, W, C)}, got {out.shape}")
    code = lib.davit_window_attention_f32(
        qkv.data_ptr(), out.data_ptr(), B, Hp, Wp, H, W, window_size, num_heads, C // num_heads,
        torch.get_num_threads(),
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"davit_window_attention_f32 returned {code} for qkv {tuple(qkv.shape)}")
    return out


def window_attention_map_backward(
    qkv: Tensor, out: Tensor, grad: Tensor, num_heads: int, window_size: int
) -> Tensor:
    """The gradient of :func:`window_attention_map` with respect to ``qkv`` (B, Hp, Wp, 3C), given its output
    ``out`` (B, H, W, C) and that output's gradient ``grad``: per window and head the probabilities are
    recomputed (as the forward does) and dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = s dS K,
    dK = s dS^T Q written into the qkv layout, padding tokens' queries zero."""
    lib = _required_library()
    _check_qkv_map("window_attention_map_backward", qkv, num_heads, window_size)
    B, Hp, Wp, C3 = qkv.shape
    C, (H, W) = C3 // 3, out.shape[1:3]
    for name, t in (("out", out), ("grad", grad)):
        if t.shape != (B, H, W, C) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(
                f"window_attention_map_backward: {name} must be CPU fp32 {(B, H, W, C)}, got "
                f"{t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if not (0 < H <= Hp and 0 < W <= Wp):
        raise ValueError(
            f"window_attention_map_backward: the qkv map {Hp}x{Wp} must cover the {H}x{W} output"
        )
    out, grad = out.contiguous(), grad.contiguous()
    dqkv = torch.empty_like(qkv)
    code = lib.davit_window_attention_backward_f32(
        qkv.data_ptr(), out.data_ptr(), grad.data_ptr(), dqkv.data_ptr(), B, Hp, Wp, H, W, window_size,
        num_heads, C // num_heads, torch.get_num_threads(),
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"davit_window_attention_backward_f32 returned {code} for qkv {tuple(qkv.shape)}")
    return dqkv


def _torch_window_attention(qkv: Tensor, num_heads: int, window_size: int, height: int, width: int) -> Tensor:
    # torch's formulation of window_attention_map: where the kernels were turned off after a graph was traced
    # (imported here: attention imports this module; aliased: this module's window_attention is the operator)
    from .attention import window_attention as windowed
    from .attention import window_partition, window_reverse

    Hp, Wp = qkv.shape[1:3]
    out = window_reverse(windowed(window_partition(qkv, window_size), num_heads), window_size, Hp, Wp)
    return out[:, :height, :width].contiguous()


@torch.library.custom_op("davit::window_attention", mutates_args=())
def window_attention(qkv: Tensor, num_heads: int, window_size: int, height: int, width: int) -> Tensor:
    """:func:`window_attention_map` (output ``height`` x ``width``) as a differentiable operator that
    torch.compile keeps as one opaque call: the training path (its backward is
    :func:`window_attention_map_backward`). Where the kernels are off when it runs (turned off after a
    graph holding it was traced) torch's partition, attention and reverse compute the same."""
    if native_library() is None:
        return _torch_window_attention(qkv, num_heads, window_size, height, width)
    # (a projection's output is contiguous; should a compiled graph hand over another layout, a copy)
    return window_attention_map(qkv.contiguous(), num_heads, window_size, out_hw=(height, width))


@window_attention.register_fake
def _(qkv: Tensor, num_heads: int, window_size: int, height: int, width: int) -> Tensor:
    return qkv.new_empty((qkv.shape[0], height, width, qkv.shape[3] // 3))


@torch.library.custom_op("davit::window_attention_backward", mutates_args=())
def _window_attention_backward(
    grad: Tensor, qkv: Tensor, out: Tensor, num_heads: int, window_size: int
) -> Tensor:
    if native_library() is None:
        return _torch_window_attention_grad(qkv, grad, num_heads, window_size)
    return window_attention_map_backward(qkv.contiguous(), out, grad, num_heads, window_size)


def _torch_window_attention_grad(qkv: Tensor, grad: Tensor, num_heads: int, window_size: int) -> Tensor:
    # the kernel's backward in torch's ops, on the partitioned windows (autograd does not record inside an
    # operator's implementation, so the gradient is written out): where the kernels were turned off
    from .attention import _split_heads, window_partition, window_reverse

    Hp, Wp, C3 = qkv.shape[1:]
    H, W = grad.shape[1:3]
    ws = window_size
    q, k, v = _split_heads(window_partition(qkv, ws), num_heads)  # (Bw, heads, N, d)
    g = window_partition(torch.nn.functional.pad(grad, (0, 0, 0, Wp - W, 0, Hp - H)), ws)
    g = g.view(*g.shape[:2], num_heads, -1).transpose(1, 2)  # padding queries: zero gradient
    s = q.shape[-1] ** -0.5
    p = (q @ k.transpose(-2, -1) * s).softmax(-1)
    dp = g @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * s
    parts = torch.stack([ds @ k, ds.transpose(-2, -1) @ q, p.transpose(-2, -1) @ g])  # (3, Bw, heads, N, d)
    windows = parts.permute(1, 3, 0, 2, 4).reshape(q.shape[0], ws * ws, C3)
    return window_reverse(windows, ws, Hp, Wp).contiguous()


@_window_attention_backward.register_fake
def _(grad: Tensor, qkv: Tensor, out: Tensor, num_heads: int, window_size: int) -> Tensor:
    return torch.empty_like(qkv)


def _window_attention_setup(ctx, inputs, output) -> None:
    qkv, num_heads, window_size, _, _ = inputs
    ctx.save_for_backward(qkv, output)
    ctx.conf = (num_heads, window_size)


def _window_attention_grad(ctx, grad: Tensor):
    qkv, out = ctx.saved_tensors
    return _window_attention_backward(grad, qkv, out, *ctx.conf), None, None, None, None


window_attention.register_autograd(_window_attention_grad, setup_context=_window_attention_setup)


@torch.compiler.assume_constant_result
def _library_available() -> bool:
    # at trace time under torch.compile the answer is baked into the graph: building or loading the library
    # is not something to trace. Kernels turned off after tracing: the operator falls back to torch's ops;
    # turned on after a graph was traced without them: torch._dynamo.reset() (or a new compile) takes them
    return native_library() is not None


def _operator_context() -> bool:
    # where the differentiable operators run: outside CPU autocast, in eager code or under torch.compile (not
    # export or TorchScript, which see torch's ops)
    return not (
        torch.is_autocast_enabled("cpu")
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )


def window_training_supports(x: Tensor, channels: int, num_heads: int, window_size: int) -> bool:
    """Whether training runs :func:`window_attention` on a map ``x`` of ``channels`` channels: CPU fp32
    outside autocast, eager or torch.compile (not export or TorchScript), a built head dim, at most
    :data:`MAX_WINDOW_TOKENS` tokens per window, and the library available."""
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and _operator_context()
        and channels % num_heads == 0
        and channels // num_heads in HEAD_DIMS
        and window_size * window_size <= MAX_WINDOW_TOKENS
    ):
        return False
    return _library_available()


def layer_norm_supports(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether :func:`layer_norm` runs for ``x`` normed over its last dimension: contiguous CPU fp32 without
    autograd, fp32 contiguous affine parameters (or none), and the library available."""
    for p in (weight, bias):
        if p is not None and (p.dtype != torch.float32 or not p.is_contiguous() or p.device.type != "cpu"):
            return False
        if p is not None and p.requires_grad and torch.is_grad_enabled():
            return False
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 1
        and x.shape[-1] > 0
        and not (x.requires_grad and torch.is_grad_enabled())
        and x.is_contiguous()
    ):
        return False
    return native_library() is not None


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)`` in the native kernel (requires
    :func:`layer_norm_supports`): to fp32 round-off, 1.2-2x ATen's speed on DaViT's widths."""
    lib = _required_library()
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (C,) or p.dtype != torch.float32 or not p.is_contiguous()):
            raise ValueError(f"layer_norm: {name} must be contiguous fp32 of shape ({C},), got {p.shape}")
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"layer_norm: x must be contiguous CPU fp32, got {x.dtype} on {x.device}")
    out = torch.empty_like(x)
    w = 0 if weight is None else weight.data_ptr()
    b = 0 if bias is None else bias.data_ptr()
    rows = x.numel() // C if C else 0
    threads = torch.get_num_threads()
    lib.davit_layer_norm_f32(x.data_ptr(), out.data_ptr(), w, b, None, None, rows, C, eps, threads)
    return out


def layer_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`layer_norm` of contiguous (..., C) ``x`` (C a multiple of 16) with each row's mean and
    ``1 / sqrt(var + eps)`` (fp32, one per row), what :func:`layer_norm_backward` reads. No autograd."""
    lib = _required_library()
    C = x.shape[-1]
    rows = x.numel() // C
    out = torch.empty_like(x)
    mean, rstd = x.new_empty(rows), x.new_empty(rows)
    w = 0 if weight is None else weight.data_ptr()
    b = 0 if bias is None else bias.data_ptr()
    threads = torch.get_num_threads()
    stats = mean.data_ptr(), rstd.data_ptr()
    lib.davit_layer_norm_f32(x.data_ptr(), out.data_ptr(), w, b, *stats, rows, C, eps, threads)
    return out, mean, rstd


def layer_norm_backward(
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    grad: Tensor,
    skip_grad: Tensor | None,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The input gradient of :func:`layer_norm_train`'s norm for output gradient ``grad``, plus ``skip_grad``
    (a residual stream's gradient, or None) in the same pass, and the weight and bias gradients asked for
    (else None), summed per fixed group of rows (independent of the thread count). All contiguous CPU fp32;
    no autograd."""
    lib = _required_library()
    C = x.shape[-1]
    gx = torch.empty_like(x)
    gw = x.new_empty(C) if weight_grad else None
    gb = x.new_empty(C) if bias_grad else None
    code = lib.davit_layer_norm_backward_f32(
        x.data_ptr(), 0 if weight is None else weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        grad.data_ptr(), 0 if skip_grad is None else skip_grad.data_ptr(), gx.data_ptr(),
        0 if gw is None else gw.data_ptr(), 0 if gb is None else gb.data_ptr(), x.numel() // C, C,
        torch.get_num_threads(),
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"davit_layer_norm_backward_f32 returned {code} for x {tuple(x.shape)}")
    return gx, gw, gb


# ----- conditional position encoding: x + depthwise_conv3x3(x) ---------------------------------------------


_POS_ENC = True


def set_pos_enc_kernel(enable: bool) -> bool:
    """Let the position encodings run :func:`pos_enc` where it applies (the default) or torch's convolution
    and add (for A/B timing). Read when eager code runs and when torch.compile traces. Returns the previous
    setting."""
    global _POS_ENC
    previous, _POS_ENC = _POS_ENC, bool(enable)
    return previous


def pos_enc_supports(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`pos_enc` runs for the (B, H, W, C) map ``x`` and a depthwise 3 x 3 convolution's
    ``weight`` (C, 1, 3, 3) and ``bias``: CPU fp32 outside autocast, C a multiple of 16, eager or
    torch.compile (not export or TorchScript: they see torch's convolution), and the library available."""
    if not (
        _POS_ENC
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and weight.dtype == torch.float32
        and weight.shape == (x.shape[3], 1, 3, 3)
        and x.shape[3] % 16 == 0
        and (bias is None or bias.dtype == torch.float32)
        and _operator_context()
    ):
        return False
    return _library_available()


def _torch_pos_enc(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # torch's formulation (the model's reference path): where the kernels were turned off after tracing
    y = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), weight, bias, 1, 1, 1, x.shape[3])
    return x + y.permute(0, 2, 3, 1)


@torch.library.custom_op("davit::pos_enc", mutates_args=())
def pos_enc(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x + depthwise_conv3x3(x)`` (zero padding 1, ``weight`` (C, 1, 3, 3), ``bias`` (C) or None) of the
    (B, H, W, C) map ``x`` in one pass of the native kernel, as a differentiable operator that torch.compile
    keeps as one opaque call (requires :func:`pos_enc_supports`). torch's convolution and add compute the
    same to fp32 round-off in two passes, its backward in three; here forward and backward are one pass each,
    2.1-4.2x as fast together on davit_tiny's maps at batch 8 (session 38; each row now also asks for the
    rows below it ahead of use, session 45), the weight and bias gradients summed more exactly (per group of
    rows, then the groups) and independently of the thread count."""
    lib = native_library()
    if lib is None:
        return _torch_pos_enc(x, weight, bias)
    x, weight = x.contiguous(), weight.contiguous()
    B, H, W, C = x.shape
    if bias is not None:
        bias = bias.contiguous()
    y = torch.empty_like(x)
    b = 0 if bias is None else bias.data_ptr()
    code = lib.davit_pos_enc_f32(
        x.data_ptr(), weight.data_ptr(), b, y.data_ptr(), B, H, W, C, torch.get_num_threads()
    )
    if code != 0:
        raise RuntimeError(f"davit_pos_enc_f32 returned {code} for x {tuple(x.shape)}")
    return y


@pos_enc.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("davit::pos_enc_backward", mutates_args=())
def _pos_enc_backward(
    grad: Tensor, x: Tensor, weight: Tensor, mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    # the gradients of pos_enc that `mask` asks for (input, weight, bias); empty tensors for the others
    C = x.shape[3]
    lib = native_library()
    if lib is None:
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [C], [1, 1], [1, 1], [1, 1], False,
            [0, 0], C, mask,
        )  # fmt: skip
        return (
            (grad + gx.permute(0, 2, 3, 1)).contiguous() if mask[0] else x.new_empty(0),
            gw.contiguous() if mask[1] else weight.new_empty(0),
            gb.contiguous() if mask[2] else weight.new_empty(0),
        )
    x, weight, grad = x.contiguous(), weight.contiguous(), grad.contiguous()
    B, H, W, _ = x.shape
    gx = torch.empty_like(x) if mask[0] else x.new_empty(0)
    gw = torch.empty_like(weight) if mask[1] else weight.new_empty(0)
    gb = weight.new_empty(C) if mask[2] else weight.new_empty(0)
    ptrs = [t.data_ptr() if m else 0 for t, m in zip((gx, gw, gb), mask)]
    code = lib.davit_pos_enc_backward_f32(
        x.data_ptr(), weight.data_ptr(), grad.data_ptr(), *ptrs, B, H, W, C, torch.get_num_threads()
    )
    if code != 0:
        raise RuntimeError(f"davit_pos_enc_backward_f32 returned {code} for x {tuple(x.shape)}")
    return gx, gw, gb


@_pos_enc_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if mask[0] else x.new_empty(0)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if mask[1] else weight.new_empty(0)
    gb = weight.new_empty(weight.shape[0]) if mask[2] else weight.new_empty(0)
    return gx, gw, gb


def _pos_enc_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _pos_enc_grad(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = _pos_enc_backward(grad, x, weight, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None)


pos_enc.register_autograd(_pos_enc_grad, setup_context=_pos_enc_setup)


# ----- exact GELU with the preceding linear's bias ---------------------------------------------------------


def bias_gelu_supports(x: Tensor, width: int, bias: Tensor | None) -> bool:
    """Whether :func:`bias_gelu` runs after a linear of ``x`` to ``width`` features with ``bias``: CPU fp32
    outside autocast, the width a multiple of 16, eager or torch.compile (not export or TorchScript), and the
    library available."""
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and width % 16 == 0
        and width > 0
        and (bias is None or (bias.dtype == torch.float32 and bias.shape == (width,)))
        and _operator_context()
    ):
        return False
    return _library_available()


@torch.library.custom_op("davit::bias_gelu", mutates_args=())
def bias_gelu(a: Tensor, bias: Tensor | None) -> Tensor:
    """``gelu(a + bias)`` (exact GELU; ``a`` (..., C) a GEMM output without its bias, ``bias`` (C) or None)
    in one pass of the native kernel, as a differentiable operator (requires :func:`bias_gelu_supports`);
    its backward computes ``dh * gelu'(a + bias)`` and the bias gradient (the column sums) in one pass.
    GELU's erf is a rational approximation of about 1 ulp (torch's own differs from float64 by as much);
    summed per fixed group of rows, the bias gradient does not depend on the thread count. Where the kernels
    are off when it runs (turned off after tracing) torch's ops compute the same."""
    lib = native_library()
    if lib is None:
        return torch.nn.functional.gelu(a if bias is None else a + bias)
    a = a.contiguous()
    return _bias_gelu_call(lib, a, bias, torch.empty_like(a), None)


def _bias_gelu_call(lib: ctypes.CDLL, a: Tensor, bias: Tensor | None, h: Tensor, d: Tensor | None) -> Tensor:
    # davit_bias_gelu_f32 on contiguous (..., C) a into h (which may be a), GELU's derivative into d where
    # given (which may be a); returns h
    C = a.shape[-1]
    bias = None if bias is None else bias.contiguous()  # (held: the kernel reads it through a pointer)
    b = 0 if bias is None else bias.data_ptr()
    dp = None if d is None else d.data_ptr()
    threads = torch.get_num_threads()
    code = lib.davit_bias_gelu_f32(a.data_ptr(), b, h.data_ptr(), dp, a.numel() // C, C, threads)
    if code != 0:
        raise RuntimeError(f"davit_bias_gelu_f32 returned {code} for {tuple(a.shape)}")
    return h


@bias_gelu.register_fake
def _(a: Tensor, bias: Tensor | None) -> Tensor:
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@torch.library.custom_op("davit::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward(
    grad: Tensor, a: Tensor, bias: Tensor | None, bias_grad: bool
) -> tuple[Tensor, Tensor]:
    # (dL/da, dL/dbias) of bias_gelu; an empty bias gradient unless bias_grad
    lib = native_library()
    if lib is None:
        da = torch.ops.aten.gelu_backward(grad, a if bias is None else a + bias)
        return da, da.reshape(-1, a.shape[-1]).sum(0) if bias_grad else a.new_empty(0)
    a, grad = a.contiguous(), grad.contiguous()
    bias = None if bias is None else bias.contiguous()
    C = a.shape[-1]
    da = torch.empty_like(a)
    db = a.new_empty(C) if bias_grad else a.new_empty(0)
    code = lib.davit_bias_gelu_backward_f32(
        a.data_ptr(), 0 if bias is None else bias.data_ptr(), grad.data_ptr(), da.data_ptr(),
        db.data_ptr() if bias_grad else 0, a.numel() // C, C, torch.get_num_threads(),
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"davit_bias_gelu_backward_f32 returned {code} for {tuple(a.shape)}")
    return da, db


@_bias_gelu_backward.register_fake
def _(grad: Tensor, a: Tensor, bias: Tensor | None, bias_grad: bool) -> tuple[Tensor, Tensor]:
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    return da, a.new_empty(a.shape[-1]) if bias_grad else a.new_empty(0)


def _bias_gelu_setup(ctx, inputs, output) -> None:
    a, bias = inputs
    ctx.save_for_backward(a, bias)


def _bias_gelu_grad(ctx, grad: Tensor):
    a, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[1]
    da, db = _bias_gelu_backward(grad, a, bias, bias_grad)
    return da, db if bias_grad else None


bias_gelu.register_autograd(_bias_gelu_grad, setup_context=_bias_gelu_setup)


def bias_gelu_(a: Tensor, bias: Tensor | None) -> Tensor:
    """``gelu(a + bias)`` (exact GELU) written over the contiguous (..., C) ``a`` in one pass of the native
    kernel (torch's ops where the kernels are off); returns ``a``. No autograd: inference (see
    :func:`davit.layers.fused.gelu_apart`); requires :func:`bias_gelu_supports`."""
    if not a.is_contiguous():
        raise ValueError(f"bias_gelu_ overwrites its input, which must be contiguous: {a.stride()}")
    lib = native_library()
    if lib is None:
        return torch.nn.functional.gelu(a if bias is None else a.add_(bias))
    return _bias_gelu_call(lib, a, bias, a, None)


def bias_gelu_with_grad_(a: Tensor, bias: Tensor | None) -> Tensor:
    """``gelu(a + bias)`` (exact GELU), overwriting the contiguous (..., C) ``a`` with ``gelu'(a + bias)``,
    in one pass of the native kernel (torch's ops where the kernels are off): what an MLP's backward needs
    of its hidden pre-activation, as a factor a GEMM's epilogue can apply (see
    :func:`davit.layers.fused.train_mlp`). No autograd; requires :func:`bias_gelu_supports`."""
    lib = native_library()
    if lib is None:
        t = a if bias is None else a + bias
        h = torch.nn.functional.gelu(t)
        a.copy_(torch.ops.aten.gelu_backward(torch.ones_like(t), t))
        return h
    if not a.is_contiguous():
        raise ValueError(f"bias_gelu_with_grad_ overwrites its input, which must be contiguous: {a.stride()}")
    return _bias_gelu_call(lib, a, bias, torch.empty_like(a), a)


# ----- a linear's weight (and bias) gradient --------------------------------------------------------------

_WEIGHT_GRAD = True


def set_weight_grad_kernel(enable: bool) -> bool:
    """Let CPU fp32 training compute its oneDNN linears' weight and bias gradients in
    :func:`linear_weight_grad` where it applies (the default) or oneDNN's convolution backward, MKL's ``mm``
    and torch's column sum (for A/B timing). Read when eager code runs and when torch.compile
    traces the backward (not part of the compile caches' keys: compare compiled settings with those caches
    off, see ``benchmarks/switch_ab.py``). Returns the previous setting."""
    global _WEIGHT_GRAD
    previous, _WEIGHT_GRAD = _WEIGHT_GRAD, bool(enable)
    return previous


def linear_weight_grad_supports(g: Tensor, x: Tensor) -> bool:
    """Whether :func:`linear_weight_grad` computes ``g.t() @ x`` for (M, N) rows ``g`` and (M, K) rows ``x``:
    CPU fp32 outside autocast, N a multiple of 4 and K of 16 (every linear of davit's variants), at least 8
    bands of 4 rows of the result per thread (N >= 32 * threads: the kernel splits the rows among the threads,
    not the tokens, so fewer would leave threads idle or uneven; measured on 2 cores only), eager or
    torch.compile, the kernel on (:func:`set_weight_grad_kernel`) and the library available and built for
    AVX-512 (elsewhere the kernel runs far below the GEMM libraries' rate: see the source)."""
    if not (
        _WEIGHT_GRAD
        and g.device.type == "cpu"
        and x.device.type == "cpu"
        and g.dtype == torch.float32
        and x.dtype == torch.float32
        and g.dim() == 2
        and x.dim() == 2
        and g.shape[0] == x.shape[0]
        and g.shape[1] > 0
        and g.shape[1] % 4 == 0
        and g.shape[1] >= 32 * torch.get_num_threads()
        and x.shape[1] > 0
        and x.shape[1] % 16 == 0
        and _operator_context()
    ):
        return False
    lib = native_library()
    return lib is not None and lib.davit_linear_weight_grad_fast() == 1


@torch.library.custom_op("davit::linear_weight_grad", mutates_args=())
def linear_weight_grad(g: Tensor, x: Tensor, bias_grad: bool) -> tuple[Tensor, Tensor]:
    """``(g.t() @ x, g.sum(0))`` for (M, N) rows ``g`` (a linear's output gradient) and (M, K) rows ``x`` (its
    input): the linear's weight gradient from the native kernel (requires
    :func:`linear_weight_grad_supports`) and, with ``bias_grad``, its bias gradient from the same kernel
    (else an empty tensor). Each thread owns a band of the weight gradient's rows (of its columns where ``x``
    is wider than ``g``: the kernel then computes ``x.t() @ g`` and transposes it), every element is summed
    over the tokens in chunks of 128-512 (set by the shape) in order: the result does not depend on the
    thread count. The bias sums go one level deeper (over 16 tokens, the chunk, groups of 8 chunks, all),
    as accurate as torch's sum (a single sum per chunk had 2-5x its error, which a compiled-vs-eager test
    caught), and read each chunk of ``g`` a second time from cache, not from memory (1.0-1.29x the speed
    of the kernel and torch's sum per call on davit_tiny's shapes).
    Where the kernels are off when it runs, torch's ops compute it."""
    lib = native_library()
    if lib is None:
        return g.t() @ x, g.sum(0) if bias_grad else g.new_empty(0)
    g, x = g.contiguous(), x.contiguous()
    (m, n), k = g.shape, x.shape[1]
    gw, gb = g.new_empty((n, k)), g.new_empty(n if bias_grad else 0)
    code = lib.davit_linear_weight_grad_f32(
        g.data_ptr(), x.data_ptr(), gw.data_ptr(), gb.data_ptr() if bias_grad else None, m, n, k,
        torch.get_num_threads(),
    )
    if code != 0:
        shapes = f"{tuple(g.shape)}, {tuple(x.shape)}"
        raise RuntimeError(f"davit_linear_weight_grad_f32 returned {code} for {shapes}")
    return gw, gb


@linear_weight_grad.register_fake
def _(g: Tensor, x: Tensor, bias_grad: bool) -> tuple[Tensor, Tensor]:
    return g.new_empty((g.shape[1], x.shape[1])), g.new_empty(g.shape[1] if bias_grad else 0)


# ----- channel group attention ---------------------------------------------------------------------------

#: channels per group the channel-attention kernel is built for (davit's variants all have 32)
CHANNEL_GROUP_DIMS = (16, 32, 64)
_CHANNEL = True


def set_channel_attention_kernel(enable: bool) -> bool:
    """Let channel attention run :func:`channel_attention` where it applies (the default) or torch's
    matmuls (for A/B timing). Read when eager code runs and when torch.compile traces. Returns the previous
    setting."""
    global _CHANNEL
    previous, _CHANNEL = _CHANNEL, bool(enable)
    return previous


def channel_attention_kernel_enabled() -> bool:
    """The setting of :func:`set_channel_attention_kernel` (``davit bench`` reports it)."""
    return _CHANNEL


def channel_attention_supports(qkv: Tensor, groups: int, width: int | None = None) -> bool:
    """Whether :func:`channel_attention` runs on ``qkv`` (B, N, 3C) with ``groups`` groups: CPU fp32 outside
    autocast, eager or torch.compile (not export or TorchScript), C / groups in :data:`CHANNEL_GROUP_DIMS`,
    and the library available. ``width``: 3C, where ``qkv`` is the qkv projection's input (B, N, C) instead
    (asked before the projection runs)."""
    width = qkv.shape[-1] if width is None else width
    if not (
        _CHANNEL
        and qkv.device.type == "cpu"
        and qkv.dtype == torch.float32
        and qkv.dim() == 3
        and _operator_context()
        and width % (3 * groups) == 0
        and width // 3 // groups in CHANNEL_GROUP_DIMS
    ):
        return False
    return _library_available()


def _channel_roles(n: int, c: int, groups: int, v2: bool) -> tuple[int, int, int, float]:
    # (query, key, value) chunks of qkv and the logit scale, as davit.layers.attention._roles has them
    q, k, v = (0, 1, 2) if v2 else (1, 2, 0)
    return q, k, v, (n**-0.5 if v2 else (c // groups) ** -0.5)


def _channel_attention_call(qkv: Tensor, groups: int, v2: bool, keep_attn: bool) -> tuple[Tensor, Tensor]:
    # (out (B, N, C), the attention (B, G, D, D) where kept for the backward, else an empty tensor)
    B, N, C3 = qkv.shape
    C = C3 // 3
    lib = native_library()
    if lib is None:  # turned off after tracing: torch's ops
        from .attention import _channel_attention_per_group

        out, attns = _channel_attention_per_group(qkv, groups, v2)
        return out, torch.stack(attns, 1) if keep_attn else qkv.new_empty(0)
    qkv = qkv.contiguous()
    out = qkv.new_empty((B, N, C))
    attn = qkv.new_empty((B, groups, C // groups, C // groups) if keep_attn else 0)
    code = lib.davit_channel_attention_f32(
        qkv.data_ptr(), out.data_ptr(), attn.data_ptr() if keep_attn else None, B, N, C, groups,
        *_channel_roles(N, C, groups, v2), torch.get_num_threads(),
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"davit_channel_attention_f32 returned {code} for qkv {tuple(qkv.shape)}")
    return out, attn


@torch.library.custom_op("davit::channel_attention", mutates_args=())
def _channel_attention(qkv: Tensor, groups: int, v2: bool) -> tuple[Tensor, Tensor]:
    # (out (B, N, C), the attention (B, G, D, D), kept for the backward)
    return _channel_attention_call(qkv, groups, v2, keep_attn=True)


@_channel_attention.register_fake
def _(qkv: Tensor, groups: int, v2: bool) -> tuple[Tensor, Tensor]:
    B, N, C3 = qkv.shape
    d = C3 // 3 // groups
    return qkv.new_empty((B, N, C3 // 3)), qkv.new_empty((B, groups, d, d))


@torch.library.custom_op("davit::channel_attention_backward", mutates_args=())
def _channel_attention_backward(grad: Tensor, qkv: Tensor, attn: Tensor, groups: int, v2: bool) -> Tensor:
    B, N, C3 = qkv.shape
    C = C3 // 3
    lib = native_library()
    if lib is None:
        return _torch_channel_attention_grad(grad, qkv, attn, groups, v2)
    qkv, attn, grad = qkv.contiguous(), attn.contiguous(), grad.contiguous()
    dqkv = torch.empty_like(qkv)
    code = lib.davit_channel_attention_backward_f32(
        qkv.data_ptr(), attn.data_ptr(), grad.data_ptr(), dqkv.data_ptr(), B, N, C, groups,
        *_channel_roles(N, C, groups, v2), torch.get_num_threads(),
    )  # fmt: skip
    if code != 0:
        raise RuntimeError(f"davit_channel_attention_backward_f32 returned {code} for qkv {tuple(qkv.shape)}")
    return dqkv


def _torch_channel_attention_grad(grad: Tensor, qkv: Tensor, attn: Tensor, groups: int, v2: bool) -> Tensor:
    # the kernel's backward in torch's ops (autograd does not record inside an operator): kernels turned off
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, v, scale = _channel_roles(N, C, groups, v2)
    parts = qkv.view(B, N, 3, groups, C // groups).permute(2, 0, 3, 1, 4)  # (3, B, G, N, D)
    query, key, value = parts[q], parts[k], parts[v]
    d_out = grad.reshape(B, N, groups, C // groups).transpose(1, 2)  # (B, G, N, D)
    d_attn = d_out.transpose(-1, -2) @ value
    d_logits = attn * (d_attn - (d_attn * attn).sum(-1, keepdim=True)) * scale
    d = [None, None, None]
    d[q], d[k], d[v] = key @ d_logits.transpose(-1, -2), query @ d_logits, d_out @ attn
    return torch.stack(d).permute(1, 3, 0, 2, 4).reshape(B, N, C3)


@_channel_attention_backward.register_fake
def _(grad: Tensor, qkv: Tensor, attn: Tensor, groups: int, v2: bool) -> Tensor:
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _channel_attention_setup(ctx, inputs, output) -> None:
    qkv, groups, v2 = inputs
    ctx.save_for_backward(qkv, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.conf = (groups, v2)


def _channel_attention_grad(ctx, grad: Tensor, _grad_attn: Tensor | None):
    qkv, attn = ctx.saved_tensors
    return _channel_attention_backward(grad, qkv, attn, *ctx.conf), None, None


_channel_attention.register_autograd(_channel_attention_grad, setup_context=_channel_attention_setup)


def channel_attention(qkv: Tensor, groups: int, v2: bool = False) -> Tensor:
    """Channel group attention of ``qkv`` (B, N, 3C) in the native kernel, as a differentiable operator
    that torch.compile keeps as one opaque call (requires :func:`channel_attention_supports`): per image and
    group of D = C / groups channels, A = softmax(s Q^T K) (D x D) and out = V A^T, the roles and scale
    of :func:`davit.layers.attention.channel_attention_ref` (V1 or, with ``v2``, Florence-2's). Its backward
    writes the qkv gradient in one pass per group: dV = dO A, dA = dO^T V, dS = s A * (dA - rowsum(dA * A)),
    dQ = K dS^T, dK = Q dS. The sums over tokens run per fixed chunk of tokens and are added in a fixed
    order: results do not depend on the thread count. Without autograd in eager code (inference) it calls
    the kernel directly, keeping no attention."""
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and qkv.requires_grad):
        return _channel_attention_call(qkv, groups, v2, keep_attn=False)[0]
    return _channel_attention(qkv, groups, v2)[0]
