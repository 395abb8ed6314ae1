import os
import subprocess
import sys

import pytest
import torch

# The native kernels run by default only where their library is built for AVX-512 or AVX2
# (davit.layers.native.default_native_kernels); the suite checks them, and the paths that call them, on every
# machine. The tests of the default set it themselves.
os.environ.setdefault("DAVIT_NATIVE_KERNELS", "1")

# Every torch.compile in the suite keys inductor's and AOTAutograd's caches as davit's own compiles do
# (davit.compile_cache: the operators' code and inductor's vector ISA). Without it a warm cache could serve
# a backward compiled from older operator code (PyTorch issue 144344) or a graph compiled for another ISA:
# the suite run under ATEN_CPU_CAPABILITY=avx2 with a cache filled by AVX-512 runs got NaN (session 51).
import torch._inductor.config  # noqa: E402

from davit.compile_cache import code_version_pass  # noqa: E402

torch._inductor.config.post_grad_custom_post_pass = code_version_pass()

# CI has 2 cores; keep torch from oversubscribing when pytest runs alongside subprocesses (or with
# pytest-xdist workers: one thread each)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


class _FakeKernelLibrary:
    """Stands in for davit's native kernel library where only its build's report is asked for."""

    def __init__(self, bits: int) -> None:
        self._bits = bits

    def davit_native_vector_bits(self) -> int:
        return self._bits


@pytest.fixture
def fake_kernel_library() -> type:
    """A stand-in for the native library built for vectors of ``bits`` bits: ``fake_kernel_library(256)``."""
    return _FakeKernelLibrary


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_threads():
    # a test that runs `davit bench --threads 1` in process must not leave the tests after it on one thread:
    # the stage-map parity with timm once passed in the suite only because of such a leak (session 30)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def davit_cli():
    """``run(args, cwd, nproc=1)``: ``python -m davit ARGS`` in a fresh process (``nproc`` > 1: that many
    under torchrun, gloo), one thread per process; asserts exit 0 and returns the CompletedProcess."""

    def run(args: list[str], cwd, nproc: int = 1) -> subprocess.CompletedProcess:
        head = [sys.executable, "-m", "davit"]
        if nproc > 1:
            torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
            head = [sys.executable, *torchrun, "-m", "davit"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if nproc > 1 and cwd is not None:  # torchrun leaves a log folder per run in the temp directory
            env["TMPDIR"] = str(cwd)
        r = subprocess.run([*head, *args], capture_output=True, text=True, env=env, timeout=600, cwd=cwd)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    return run


@pytest.fixture
def aot_capture():
    """``(backend, graphs)``: a torch.compile backend (AOT autograd, the forward and backward run as traced)
    that appends every forward and backward graph it is handed to ``graphs["forward"]`` and
    ``graphs["backward"]`` (the graphs inductor would lower, without its C++ compilation), to check which ops
    compiled code calls."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, _inputs):
            graphs[kind].append(gm)
            return gm.forward

        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs
