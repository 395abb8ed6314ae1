"""davit.alloc: glibc's thresholds are set so that freed memory is reused, not faulted in again.

The behaviour is measured in fresh processes (malloc's state is per process) by counting minor page faults,
which are deterministic where step times are not."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from davit import alloc

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# four 40 MiB blocks (davit_tiny's stage-1 activations at batch 8 are 38.5 MiB) written, then freed, eight
# times: glibc's default mmap threshold never exceeds 32 MiB, so each block is mapped and unmapped again and
# every round faults its 40960 pages in again
_CHURN = """
import json, resource, sys
import torch
if sys.argv[1] == "tuned":
    from davit.alloc import tune_malloc
    print(tune_malloc(), file=sys.stderr)
faults = []
for _ in range(8):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(10 << 20) for _ in range(4)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps(faults[-3:]))  # the steady state: a tuned heap takes a few rounds to grow
"""


def _churn_faults(setting: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAVIT_MALLOC_TUNING", "GLIBC_TUNABLES")}
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, setting], env=env, capture_output=True, text=True, check=True
    )
    if setting == "tuned":
        assert "glibc malloc: freed memory kept for reuse" in out.stderr, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_tuned_malloc_reuses_freed_memory_instead_of_faulting_it_in_again():
    default, tuned = _churn_faults("default"), _churn_faults("tuned")
    # the defaults give the 160 MiB back and fault its 40960 pages in again every round
    assert min(default) > 30000, default
    assert max(tuned) < 1000, tuned


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("DAVIT_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(alloc, "_done", None)
    return monkeypatch


def test_switched_off_by_the_environment(clean_env):
    clean_env.setenv("DAVIT_MALLOC_TUNING", "0")
    assert alloc.tune_malloc() == "glibc malloc: off (DAVIT_MALLOC_TUNING=0)"


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
@pytest.mark.parametrize(
    "var, value, says",
    [
        ("MALLOC_TRIM_THRESHOLD_", "4096", "left as set by MALLOC_TRIM_THRESHOLD_"),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536", "left as set by GLIBC_TUNABLES"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "a preloaded allocator"),
    ],
)
def test_a_users_own_malloc_settings_are_left_alone(clean_env, var, value, says):
    clean_env.setenv(var, value)
    line = alloc.tune_malloc()
    assert says in line and "kept for reuse" not in line


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_set_once_per_process(clean_env):
    first = alloc.tune_malloc()
    assert first.startswith("glibc malloc: freed memory kept for reuse")
    clean_env.setenv("DAVIT_MALLOC_TUNING", "0")  # too late: the thresholds are already set
    assert alloc.tune_malloc() == first
