"""Summarise the runs of benchmarks/run_gpu_train.sh as one markdown table for docs/benchmarks.md.

usage: python benchmarks/train_report.py OUT_DIR
Steady-state img/s is measured between the logged step nearest 30% of the run and the last one, so the first
steps (warm-up, and compilation for `--torchcompile`) are left out; peak memory is the largest `max_mem_gb`
logged (CUDA only). Each row names its run folder, whose log holds the exact command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from davit.train.logging import read_metrics  # skips a torn last line


def _config(run: Path) -> dict:
    if (run / "config.json").is_file():  # davit detect|segment train
        return json.loads((run / "config.json").read_text())
    return yaml.safe_load((run / "config.yaml").read_text())  # davit train


def summarise(run: Path) -> dict | None:
    train = sorted(
        (r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"), key=lambda r: r["step"]
    )
    if len(train) < 2:
        return None
    cfg = _config(run)
    last = train[-1]
    first = min(train[:-1], key=lambda r: abs(r["step"] - 0.3 * last["step"]))
    # global for the dense tasks; per process for davit train (one process in run_gpu_train.sh)
    batch = int(cfg["batch_size"])
    dt = last["time"] - first["time"]
    mem = [r["max_mem_gb"] for r in train if "max_mem_gb" in r]
    task = cfg.get("task", "classify")
    size = {
        "classify": f"{cfg.get('img_size')} px",
        "detect": f"short side {cfg.get('min_sizes')}, long <= {cfg.get('max_size')}",
        "segment": f"{cfg.get('crop_size')} px crops",
    }[task]
    return {
        "run": run.name,
        "task/model": f"{task} {cfg['model']}",
        "size": size,
        "batch": batch,
        "amp": ("bf16" if cfg.get("amp_dtype", "bfloat16") == "bfloat16" else cfg["amp_dtype"])
        if cfg.get("amp")
        else "fp32",
        "compile": bool(cfg.get("torchcompile")),
        "steps": last["step"],
        "img_per_s": (last["step"] - first["step"]) * batch / dt if dt > 0 else None,
        "max_mem_gb": max(mem) if mem else None,
        "loss": (train[0]["loss"], last["loss"]),
    }


def render(out: Path) -> str:
    rows = [s for m in sorted(out.glob("*/metrics.jsonl")) if (s := summarise(m.parent))]
    machine = (
        (out / "machine.txt").read_text().strip().replace("\n", "; ")
        if (out / "machine.txt").exists()
        else "?"
    )
    lines = [
        f"Machine: {machine}.",
        "",
        "| run | task / model | size | batch | autocast | compile | steps | img/s (steady) | peak GPU GB "
        "| loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ips = "–" if r["img_per_s"] is None else f"{r['img_per_s']:.1f}"
        mem = "–" if r["max_mem_gb"] is None else f"{r['max_mem_gb']:.2f}"
        lines.append(
            f"| {r['run']} | {r['task/model']} | {r['size']} | {r['batch']} | {r['amp']} | {r['compile']} | "
            f"{r['steps']} | {ips} | {mem} | {r['loss'][0]:.3f} -> {r['loss'][1]:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(render(Path(sys.argv[1])))
