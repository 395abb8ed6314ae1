"""Native CPU kernels (``davit/csrc``), compiled on first use with the machine's C++ compiler and cached.

For CPU fp32 inference: window self-attention (:func:`window_attention_map`), read from the map's qkv
projection and written into the output map, so the windows are never partitioned or reversed as copies;
and layer norm over rows (:func:`layer_norm`). The library has a plain C ABI and no torch headers: it builds
in about a second, does not depend on torch's version, and is loaded with ctypes. Its threads are OpenMP's,
as many as torch's.

The library is built for the CPU it runs on (``-march=native``) into ``$DAVIT_CACHE_DIR`` (default
``$XDG_CACHE_HOME/davit`` or ``~/.cache/davit``), under a name hashed from the source, the compiler, its
flags and the CPU's model and flags, so one cache can serve machines of several kinds. Where there is no
compiler, the build fails or the library cannot be loaded, a warning says why once and the model runs the
portable path (torch's fused attention and layer norm), with the same results to fp32 round-off.
``DAVIT_NATIVE_KERNELS=0`` turns the kernels off, ``1`` (or unset) allows them.
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
    "window_attention_map",
    "window_kernel_supports",
    "layer_norm",
    "layer_norm_supports",
    "build_error",
]

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_kernels.cpp"
_ABI = 2
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
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


def _env_enabled() -> bool:
    from .fused import _env_switch  # here: fused imports this module

    return _env_switch("DAVIT_NATIVE_KERNELS", on="native CPU kernels", off="torch's ops only") is not False


def native_kernels_enabled() -> bool:
    """Whether the native kernels may run (``DAVIT_NATIVE_KERNELS``, or :func:`set_native_kernels`)."""
    global _enabled
    if _enabled is None:
        _enabled = _env_enabled()
    return _enabled


def set_native_kernels(enabled: bool | None) -> None:
    """Allow (``True``) or forbid (``False``) the native kernels in this process; ``None``: the environment's
    setting again. Read when the model runs: no recompilation."""
    global _enabled
    _enabled = None if enabled is None else bool(enabled)


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
    fn = lib.davit_layer_norm_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [i64, i64, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, built first if needed; ``None`` (with one warning saying why) where it
    cannot be built or loaded, or the kernels are turned off."""
    global _library, _tried, _error
    if not native_kernels_enabled():
        return None
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


def window_kernel_supports(x: Tensor, channels: int, num_heads: int, window_size: int) -> bool:
    """Whether :func:`window_attention_map` runs for a map ``x`` of ``channels`` channels (the normed map, or
    its qkv projection): CPU fp32 without autograd, a built head dim (:data:`HEAD_DIMS`), at most
    :data:`MAX_WINDOW_TOKENS` tokens per window, and the library available."""
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
    lib = native_library()
    if lib is None:
        raise RuntimeError(f"davit's native CPU kernels are not available: {_error or 'turned off'}")
    if qkv.dim() != 4 or qkv.dtype != torch.float32 or qkv.device.type != "cpu" or not qkv.is_contiguous():
        raise ValueError(
            "window_attention_map: qkv must be a contiguous CPU fp32 (B, Hp, Wp, 3C) map, got "
            f"{qkv.dtype} {tuple(qkv.shape)} on {qkv.device} (contiguous: {qkv.is_contiguous()})"
        )
    B, Hp, Wp, C3 = qkv.shape
    C = C3 // 3
    H, W = (Hp, Wp) if out_hw is None else out_hw
    if C3 % (3 * num_heads) or (C // num_heads) not in HEAD_DIMS or window_size**2 > 256:
        raise ValueError(
            f"window_attention_map: {num_heads} heads of {C3 // 3} channels, window {window_size}: "
            f"head dims {HEAD_DIMS} and at most 256 tokens per window are built"
        )
    if Hp % window_size or Wp % window_size or not (0 < H <= Hp and 0 < W <= Wp):
        raise ValueError(
            f"window_attention_map: the qkv map {Hp}x{Wp} must be whole {window_size}x{window_size} "
            f"windows and cover the {H}x{W} output"
        )
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
    lib = native_library()
    if lib is None:
        raise RuntimeError(f"davit's native CPU kernels are not available: {_error or 'turned off'}")
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
    lib.davit_layer_norm_f32(x.data_ptr(), out.data_ptr(), w, b, rows, C, eps, torch.get_num_threads())
    return out
