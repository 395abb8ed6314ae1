"""The profiling script of benchmarks/ runs end to end at tiny sizes (its timings are never asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"


def _run(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--threads", "1", *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("task, batch", [("classify", "4"), ("segment", "2")])
def test_profile_step_times_and_profiles_the_demo_step(task, batch):
    out = _run("--task", task, "-b", batch, "--steps", "1", "--rounds", "2", "--rows", "5", "--by-shape")
    m = re.search(rf"{task}, batch {batch}, 1 threads: median ([\d.]+) ms per step", out)
    assert m and float(m.group(1)) > 0, out
    assert "Self CPU time total" in out
    # --by-shape: the heaviest ops with the shapes they ran on (the batch is the leading dimension somewhere)
    assert re.search(rf"ms/step  x\d+  \[\[{batch}, ", out), out


def test_profile_step_vs_timm_lists_both_models_per_op():
    pytest.importorskip("timm")
    out = _run(
        "--task", "vs-timm", "--img-size", "64", "-b", "1", "--steps", "1", "--rounds", "2", "--rows", "8"
    )
    assert "davit_tiny b1 64 px forward + backward, 2 interleaved rounds" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("aten::")}
    # both models run their linears as matrix products: a positive time in each column
    gemm = rows.get("aten::mm") or rows.get("aten::addmm")
    assert gemm is not None and all(float(v) > 0 for v in gemm), out
