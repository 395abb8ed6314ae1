"""What a person sees while training: a rich progress bar (ETA, loss, lr, img/s) on a terminal, plain lines
otherwise; and what is kept: ``metrics.jsonl`` (one JSON object per line) and TensorBoard events."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["Progress", "MetricsLogger", "memory_fields", "read_metrics"]


class Progress:
    """``with Progress(total, desc, mode) as p: p.update(n, **fields)``; ``mode``: auto, rich, plain, none."""

    def __init__(self, total: int, desc: str, mode: str = "auto", every: int = 50) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"  # rich draws on stdout
        self.mode, self.total, self.desc, self.every = mode, total, desc, max(1, every)
        self.done, self.t0 = 0, time.time()
        self._bar = None

    def __enter__(self) -> Progress:
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.desc, total=self.total, info="")
        return self

    def update(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        if self.mode == "rich" and self._bar is not None:
            self._bar.update(self._task, advance=n, info=info)
        elif self.mode == "plain" and (self.done % self.every == 0 or self.done == self.total):
            el = time.time() - self.t0
            eta = el / self.done * (self.total - self.done) if self.done else 0.0
            print(f"{self.desc} {self.done}/{self.total} [{_hms(el)}<{_hms(eta)}] {info}", flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if (abs(v) < 1e-2 and v != 0) else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class MetricsLogger:
    """Appends records to ``run_dir/metrics.jsonl`` and scalars to TensorBoard (``run_dir/tb``). Only rank 0
    makes one (the trainer passes ``None`` elsewhere)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, truncate_after_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if truncate_after_step is not None and self.path.exists():
            # resuming: drop records written after the checkpoint, so the file tells one consistent story
            # (a line torn by a crash mid-write, e.g. a full disk or a power cut, is dropped with them)
            keep = [
                json.dumps(rec)
                for rec in _records(self.path.read_text())
                if rec.get("step", 0) <= truncate_after_step
            ]
            self.path.write_text("".join(k + "\n" for k in keep))
        self._f = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=truncate_after_step)
            except ImportError:  # tensorboard not installed: jsonl still has everything
                self.tb = None

    def log(self, kind: str, step: int, **values: Any) -> None:
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def memory_fields(device: torch.device) -> dict[str, float]:
    """``{"max_mem_gb": ...}``: the peak GPU memory allocated so far on ``device`` (CUDA only, else {})."""
    if device.type != "cuda":
        return {}
    return {"max_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}


def _records(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl text, skipping lines that do not parse (torn by a crash)."""
    out = []
    for ln in text.splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file ([] if it does not exist); torn lines are skipped."""
    p = Path(path)
    return _records(p.read_text()) if p.exists() else []
