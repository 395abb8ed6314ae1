"""Crash-safe training checkpoints.

Each checkpoint is written atomically (temporary file in the same folder, fsync, rename, fsync of the
folder) and has a ``.sha256`` sidecar in ``sha256sum`` format, written the same way *after* the data file: a
checkpoint without a matching sidecar (crash between the two, truncated copy, bit rot) is invalid and
skipped by :func:`find_latest_valid`. Files are read with ``torch.load(weights_only=True)`` only, so
checkpoints hold tensors and plain Python containers, nothing else (RNG states are converted accordingly).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_write",
    "save_checkpoint",
    "verify_checkpoint",
    "load_checkpoint",
    "find_latest_valid",
    "CheckpointManager",
    "set_aside_files",
    "rng_state",
    "set_rng_state",
    "CheckpointError",
]

log = logging.getLogger(__name__)
_NAME = re.compile(r"ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupted or does not verify."""


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # e.g. not permitted on some file systems: the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old content or all of the new one, never torn."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        # disk full / I/O error: drop the partial file (it holds the space we lack) and say what to do;
        # the previous file at ``path`` was never touched
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write {p} ({e.strerror or e}); the previous checkpoint is intact — free space "
            f"on {p.parent} (or pass another --output) and resume with --resume auto"
        ) from e
    _fsync_dir(p.parent)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> str:
    """Serialise ``state`` with torch.save, write it atomically with its sha256 sidecar; return the digest."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    p = Path(path)
    side = p.with_name(p.name + ".sha256")
    if side.exists():
        # re-saving a path (best.pt, or a step saved again): withdraw the old checksum first, so that a crash
        # between the two renames below leaves an uncommitted file (skipped) rather than new data under the
        # old checksum, which would read as a committed checkpoint damaged (found by the crash driver)
        side.unlink()
        _fsync_dir(p.parent)
    atomic_write(p, data)
    atomic_write(side, f"{digest}  {p.name}\n".encode())
    return digest


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` exists and matches its ``.sha256`` sidecar."""
    p = Path(path)
    side = p.with_name(p.name + ".sha256")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not side.is_file():
        raise CheckpointError(f"checkpoint {p} has no checksum file {side.name} (interrupted write?)")
    expected = side.read_text().split()[0] if side.read_text().strip() else ""
    actual = _sha256_file(p)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {p} is corrupted: sha256 {actual[:12]}... != recorded {expected[:12]}..."
        )


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    if verify:
        verify_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged zip/pickle
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e


def find_latest_valid(folder: str | Path) -> Path | None:
    """Newest (highest step) checkpoint in ``folder`` that verifies; corrupt ones skipped with a warning."""
    d = Path(folder)
    if not d.is_dir():
        return None
    cands = sorted(((int(m.group(1)), f) for f in d.iterdir() if (m := _NAME.match(f.name))), reverse=True)
    for _, f in cands:
        try:
            verify_checkpoint(f)
            return f
        except CheckpointError as e:
            warnings.warn(f"skipping invalid checkpoint: {e}", stacklevel=2)
    return None


class CheckpointManager:
    """Keeps the last ``keep_last`` step checkpoints plus ``best.pt`` in ``folder``."""

    def __init__(self, folder: str | Path, keep_last: int = 2) -> None:
        self.folder = Path(folder)
        self.keep_last = max(1, keep_last)

    def save(self, state: dict[str, Any], step: int, is_best: bool = False) -> Path:
        p = self.folder / f"ckpt-{step:09d}.pt"
        save_checkpoint(state, p)
        if is_best:
            save_checkpoint(state, self.folder / "best.pt")
        self._prune()
        return p

    def _prune(self) -> None:
        cands = sorted(
            ((int(m.group(1)), f) for f in self.folder.iterdir() if (m := _NAME.match(f.name))), reverse=True
        )
        for _, f in cands[self.keep_last :]:
            for q in (f, f.with_name(f.name + ".sha256")):
                q.unlink(missing_ok=True)

    def latest(self) -> Path | None:
        return find_latest_valid(self.folder)

    def set_aside(self) -> Path | None:
        """Move the checkpoints of an earlier run in this folder (step checkpoints, ``best.pt``, their
        checksums, committed or not) into ``replaced-<UTC time>/`` inside it; returns that folder, or None
        when there were none. For a run that starts over in a folder an earlier run used: left in place,
        the earlier run's higher step numbers would outlive the new run's checkpoints in the pruning (which
        keeps the highest steps) and a later resume would continue the earlier run. Moved, not deleted:
        nothing saved is lost."""
        if not self.folder.is_dir():
            return None
        old = [
            f
            for f in self.folder.iterdir()
            if f.is_file() and (_NAME.match(f.name.removesuffix(".sha256")) or f.name.startswith("best.pt"))
        ]
        return set_aside_files(self.folder, old)


def set_aside_files(folder: str | Path, files: list[Path]) -> Path | None:
    """Move ``files`` (files or folders inside ``folder``) into a new ``folder/replaced-<UTC time>/``; returns
    it, or None when ``files`` is empty. Moved, not deleted: what an earlier run saved stays at hand."""
    folder = Path(folder)
    if not files:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest, n = folder / f"replaced-{stamp}", 1
    while dest.exists():  # two starts within a second
        dest, n = folder / f"replaced-{stamp}-{n}", n + 1
    dest.mkdir()
    for f in files:
        os.replace(f, dest / Path(f).name)
    _fsync_dir(folder)
    return dest


# ----- RNG states as weights_only-loadable values -----------------------------------------------------------
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _py_state_to_plain(s: tuple) -> list:
    v, internal, gauss = s
    return [v, list(internal), gauss]
