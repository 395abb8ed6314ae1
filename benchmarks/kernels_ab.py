"""The native kernels as they are against another version of their source, paired in one process.

    git show HEAD~1:src/davit/csrc/cpu_kernels.cpp > /tmp/old_kernels.cpp
    .venv/bin/python benchmarks/kernels_ab.py --base /tmp/old_kernels.cpp --rounds 13   # eager training, b8
    .venv/bin/python benchmarks/kernels_ab.py --base /tmp/old_kernels.cpp --compile --rounds 13

Both sources are built (each into the kernel cache under its own hash, as ``davit.layers.native`` builds the
library) and loaded side by side; each step runs with its own library in place (``native._library``). A
change to a kernel that keeps its calling convention (the library's ABI) is then measured as `switch_ab.py`
measures a switch: ours with the current source ("on"), ours with ``--base`` ("off"), and timm's model with
identical weights, in interleaved rounds, with the per-round ratios off / on. With ``--compile`` too: the
compiled graphs hold davit's ops, which call whichever library is in place when they run.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import switch_ab

from davit.layers import native


def _library(source: Path) -> ctypes.CDLL:
    """The library built from ``source`` (the same flags, cache and checks as the package's own)."""
    saved = native._SOURCE
    native._SOURCE = source
    try:
        return native._load()
    finally:
        native._SOURCE = saved


def main() -> None:
    args = sys.argv[1:]
    if "--base" not in args or args.index("--base") + 1 >= len(args):
        raise SystemExit("kernels_ab.py needs --base PATH: the kernel source to compare the current one with")
    i = args.index("--base")
    base = Path(args[i + 1])
    if not base.is_file():
        raise SystemExit(f"--base {base}: no such file (write one with `git show REV:src/davit/csrc/...`)")
    del args[i : i + 2]
    current = _library(native._SOURCE)
    try:
        other = _library(base)
    except RuntimeError as e:  # a build error, or another ABI (calling convention) than the package's
        raise SystemExit(f"--base {base}: {e}\n(kernels_ab.py compares sources of one kernel ABI)") from e

    def use_current(on: bool) -> bool:
        # switch_ab's setter protocol: put the library in place, return whether the current one was
        was = native._library is current
        native.set_native_kernels(True)
        native._library, native._tried = (current if on else other), True
        return was

    name = f"kernels vs {base.name}"
    switch_ab.SWITCHES[name] = use_current  # type: ignore[assignment]
    sys.argv = [sys.argv[0], *args, "--switch", name]
    switch_ab.main()


if __name__ == "__main__":
    main()
