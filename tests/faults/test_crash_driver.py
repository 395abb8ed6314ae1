"""The crash driver's --quick mode: a random SIGKILL, a SIGKILL the instant a checkpoint write starts, and a
SIGTERM, each resumed with --resume auto to final weights equal to an uninterrupted run's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "faults"))
import crash_driver  # noqa: E402


@pytest.mark.slow
def test_quick_crash_trials(tmp_path):
    out = tmp_path / "figures.json"
    rc = crash_driver.main(
        ["--quick", "--seed", "1", "--workdir", str(tmp_path / "runs"), "--json", str(out)]
    )
    s = json.loads(out.read_text())
    assert rc == 0, json.dumps(s["trials_detail"], indent=1)
    assert s["trials"] == 3 and s["survived"] == 3
    assert s["files_lost"] == 0 and s["max_abs_weight_diff"] == 0.0
    assert s["max_steps_lost"] <= s["checkpoint_interval"]
    term = next(r for r in s["trials_detail"] if r["mode"] == "sigterm")
    assert term["rc"] == 0 and term["steps_lost"] == 0  # SIGTERM saved its step before exiting
