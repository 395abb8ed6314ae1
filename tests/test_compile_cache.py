"""davit.compile_cache: the pass that keys inductor's and AOTAutograd's caches on davit's operator code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from davit import compile_cache


def test_uuid_follows_the_sources_contents(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.cpp"
    a.write_text("def backward(ctx, g): return g\n")
    b.write_text("int f() { return 1; }\n")
    first = compile_cache.code_version_pass((str(a), str(b))).uuid()
    assert compile_cache.code_version_pass((str(a), str(b))).uuid() == first  # same contents, same key
    a.write_text("def backward(ctx, g): return 2 * g\n")
    # (a new path tuple: torch memoises the last one it hashed)
    changed = compile_cache.code_version_pass((str(b), str(a))).uuid()
    assert changed != first


def test_sources_cover_the_operators_and_kernels():
    names = {p.rsplit("/", 1)[-1] for p in compile_cache.source_files()}
    assert {"fused.py", "native.py", "attention.py", "blocks.py", "cpu_kernels.cpp"} <= names


def test_options_keep_the_callers_and_their_own_pass():
    opts = compile_cache.compile_options({"layout_optimization": False})
    assert opts["layout_optimization"] is False
    assert isinstance(opts["post_grad_custom_post_pass"], torch._inductor.custom_graph_pass.CustomGraphPass)
    mine = object()
    kept = compile_cache.compile_options({"post_grad_custom_post_pass": mine})
    assert kept["post_grad_custom_post_pass"] is mine


def test_the_pass_changes_no_graph():
    g = torch.fx.symbolic_trace(lambda x: x * 2).graph
    before = str(g)
    compile_cache.code_version_pass()(g)
    assert str(g) == before


def test_uuid_names_the_vector_isa(monkeypatch):
    """The pass's key changes with the ISA inductor generates CPU code for (its FX graph cache key does not),
    and falls back to torch's capability and ATEN_CPU_CAPABILITY where inductor's chooser cannot be asked."""
    import torch._inductor.cpu_vec_isa as isa

    files = compile_cache.source_files()
    monkeypatch.setattr(isa, "pick_vec_isa", lambda: "avx512")
    wide = compile_cache.code_version_pass(files).uuid()
    monkeypatch.setattr(isa, "pick_vec_isa", lambda: "avx2")
    narrow = compile_cache.code_version_pass(files).uuid()
    assert wide != narrow and wide.endswith(b"|avx512") and narrow.endswith(b"|avx2")

    def broken():
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(isa, "pick_vec_isa", broken)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert compile_cache.vector_isa() == f"{torch.backends.cpu.get_cpu_capability()}/avx2"


_SDPA = """
import sys, torch
import torch.nn.functional as F
from davit.compile_cache import compile_options
torch.manual_seed(0)
x = torch.randn(2, 4, 5, 32)
f = lambda x: F.scaled_dot_product_attention(x, x * 2, x + 1)
with torch.no_grad():
    out = torch.compile(f, fullgraph=True, options=compile_options())(x)
err = (out - f(x)).abs().max().item()
print(err)
sys.exit(0 if err < 1e-5 else 1)
"""


def test_a_graph_compiled_for_avx512_is_not_served_under_avx2(tmp_path):
    """Session 51: scaled dot-product attention compiled with ATEN_CPU_CAPABILITY unset on an AVX-512 CPU,
    then served from inductor's FX graph cache under ATEN_CPU_CAPABILITY=avx2, returned NaN. With
    :func:`compile_options` the second process compiles its own graph and is right."""
    if not compile_cache.vector_isa().startswith("avx512"):
        pytest.skip("needs a CPU for which inductor generates AVX-512 code")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.pop("ATEN_CPU_CAPABILITY", None)
    for capability in (None, "avx2"):
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        cmd = [sys.executable, "-c", _SDPA]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (capability, run.stdout[-500:], run.stderr[-2000:])
