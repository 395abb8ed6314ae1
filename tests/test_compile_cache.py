"""davit.compile_cache: the pass that keys inductor's and AOTAutograd's caches on davit's operator code."""

from __future__ import annotations

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
