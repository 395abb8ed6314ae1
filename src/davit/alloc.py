"""Keep the memory a CPU training step frees for the next step, instead of handing it back to the OS.

A CPU training step allocates and frees its activations and gradients every step. PyTorch's CPU allocator
takes them from glibc's ``malloc``, which maps every block above its mmap threshold (dynamic, but never above
32 MiB) on its own and unmaps it when freed, so the next step faults every page in again and the kernel
zeroes it. davit_tiny at 224 px has 38.5 MiB activations at batch 8: 125-143 k minor page faults and
0.24-0.29 CPU-seconds of system time per step; at batch 32, 1.1-1.2 M faults and 3.1-3.3 s
(``benchmarks/malloc_step.py``, 2-core Zen 4 VM, session 21, docs/benchmarks.md).

:func:`tune_malloc` sets glibc's mmap threshold to 128 MiB and its trim threshold to 1 GiB with ``mallopt``:
smaller blocks come from the heap, and up to 1 GiB of freed heap stays in the process. There the faults fell
to 0.5-3.4 k per step at batch 8 (161-470 k at batch 32), and the step became 1.10x as fast at batch 8
(median of 5 process pairs) and 1.32x at batch 32 (3 pairs), for 0-4 % (5-23 %) more peak resident memory.
The two go together: setting the trim threshold alone (which also freezes the mmap threshold at its 128 KiB
start) made the step 1.4x slower.

It changes a process-wide setting, so the library never does it on import: the CPU training entry points
(``davit train``, ``davit detect|segment train``) call it, ``davit bench`` with ``--malloc tuned``.
``DAVIT_MALLOC_TUNING=0`` turns it off; glibc's own ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``
or ``GLIBC_TUNABLES`` and a preloaded allocator (jemalloc, tcmalloc) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "malloc_setting", "tune_malloc"]

MMAP_THRESHOLD = 128 << 20  # bytes: blocks at least this large are mapped (and unmapped) one by one
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before glibc returns memory to the OS

# mallopt parameters of glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_done: str | None = None


def _skip_reason() -> str | None:
    env = os.environ.get("DAVIT_MALLOC_TUNING", "").strip()
    if env == "0":
        return "off (DAVIT_MALLOC_TUNING=0)"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc: left as it is"
    glibc_vars = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    own = [k for k in glibc_vars if k in os.environ]
    if own:
        return f"left as set by {', '.join(own)}"
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload or "mimalloc" in preload:
        return "a preloaded allocator (LD_PRELOAD) is in charge: left as it is"
    return None


def tune_malloc() -> str:
    """Set glibc's mmap and trim thresholds (see the module docstring) once per process; returns a line
    saying what was done, for the caller's log. Never raises: where it does not apply, it says why."""
    global _done
    if _done is not None:
        return _done
    reason = _skip_reason()
    if reason is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
        except (OSError, AttributeError) as e:
            ok, reason = False, f"mallopt unavailable ({e})"
        if ok:
            reason = (
                f"freed memory kept for reuse (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
                f"{TRIM_THRESHOLD >> 30} GiB; DAVIT_MALLOC_TUNING=0 turns this off)"
            )
        elif reason is None:
            reason = "mallopt refused the thresholds: left as it is"
    _done = f"glibc malloc: {reason}"
    return _done


def malloc_setting() -> str | None:
    """The line :func:`tune_malloc` returned in this process, None where it was not called (glibc's defaults
    or the user's own settings hold)."""
    return _done
