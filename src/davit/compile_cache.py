"""Keep torch.compile's caches from serving a backward that davit's current code would not trace.

DaViT's fast paths are custom operators whose backward formulas are Python functions (``register_autograd``
in ``davit.layers``). AOTAutograd's cache keys a compiled forward and backward by the forward graph, which
names those operators but not their backward code: after a change to a backward, a warm cache keeps
returning the backward compiled from the old one (PyTorch issue 144344, open in torch 2.14). Session 42 met
it: ``davit bench --compile`` timed the weight gradients of the code before the native kernel that replaced
them, while eager code ran the new one.

:func:`code_version_pass` is a no-op post-grad pass whose ``uuid`` is a hash of ``davit.layers``' sources
and the native kernels' C++ source. Inductor puts a custom pass's ``uuid`` into both its FX graph cache key
and AOTAutograd's, so a changed operator gives new keys, and unchanged code still hits the cache. davit's
own compiled paths (``davit bench --compile``, ``davit train --torchcompile``) pass it in ``options``; a
user's own ``torch.compile`` of the model can do the same with :func:`compile_options`.

The ``uuid`` also names the vector ISA inductor generates CPU code for (:func:`vector_isa`: the CPU's best,
or the one ``ATEN_CPU_CAPABILITY`` asks for). Inductor's FX graph cache key does not (torch 2.14): a graph
compiled under one ISA and served from the cache under another returned NaN or wrong values, with no error.
Session 49 met it under an emulated AVX2 CPU (the other way round, AVX2 code served to an AVX-512 process,
wrote past its buffers) and gave the emulation its own cache directory; session 51 met it with plain torch
code (three graphs: a convolution with GELU, scaled dot-product attention, a layer norm with a linear; each
compiled with ``ATEN_CPU_CAPABILITY`` unset on an AVX-512 CPU, then served under ``avx2``: two NaN, the
third off by 1.14) and with davit_atto; a cache directory shared by machines with and without AVX-512 could
meet it too (not tried).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["code_version_pass", "compile_options", "source_files", "vector_isa"]

_ROOT = Path(__file__).resolve().parent


def source_files() -> tuple[str, ...]:
    """The files whose contents make the hash: the operators' Python and the kernels' C++."""
    files = sorted((_ROOT / "layers").glob("*.py")) + sorted((_ROOT / "csrc").glob("*.cpp"))
    return tuple(str(p) for p in files)


class _CodeVersion(CustomGraphPass):
    """Changes nothing in the graph; exists for its ``uuid``."""

    def __init__(self, files: tuple[str, ...]) -> None:
        self.files = files

    def __call__(self, graph: Any) -> None:
        return None

    def uuid(self) -> bytes:
        return get_hash_for_files(self.files) + b"|" + vector_isa().encode()


def vector_isa() -> str:
    """The vector ISA inductor generates CPU code for in this process, as inductor names it (``avx512``,
    ``avx2``, ...); where its private chooser cannot be asked, torch's CPU capability and
    ``ATEN_CPU_CAPABILITY``, which it follows."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa())
    except Exception:  # noqa: BLE001 - a private API: any failure falls back to what it depends on
        env = os.environ.get("ATEN_CPU_CAPABILITY", "")
        return f"{torch.backends.cpu.get_cpu_capability()}/{env}"


def code_version_pass(files: tuple[str, ...] | None = None) -> CustomGraphPass:
    """The no-op pass whose ``uuid`` hashes ``files`` (default: :func:`source_files`)."""
    return _CodeVersion(source_files() if files is None else files)


def compile_options(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``options`` (inductor settings for ``torch.compile(..., options=...)``) with the code-version pass as
    ``post_grad_custom_post_pass``, unless the caller already set one (theirs is kept)."""
    out = dict(options or {})
    out.setdefault("post_grad_custom_post_pass", code_version_pass())
    return out
