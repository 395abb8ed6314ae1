"""LayerNorm: the plain op everywhere but eager CUDA inference, where a Triton kernel runs.

The kernel itself runs here under Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1), and on a
CUDA machine against F.layer_norm directly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from davit import create_model
from davit.layers import native
from davit.layers import norm as norm_mod
from davit.layers.norm import LayerNorm, set_triton_layer_norm, triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_same_parameters_and_keys_as_nn_layernorm():
    ours, plain = LayerNorm(96, eps=1e-6, autocast_out=True), nn.LayerNorm(96, eps=1e-6)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 7, 96)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)


def test_cpu_keeps_the_plain_op_under_autocast():
    # autocast_out changes nothing off CUDA: dtype and values are nn.LayerNorm's under the same autocast
    norm, plain = LayerNorm(32, autocast_out=True), nn.LayerNorm(32)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = norm(x), plain(x)
    assert y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_kernel_is_opt_in(monkeypatch):
    monkeypatch.delenv("DAVIT_TRITON_LAYERNORM", raising=False)
    r = subprocess.run(
        [sys.executable, "-c", "from davit.layers.norm import _ENABLED; print(_ENABLED)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.stdout.strip() == "False", r.stderr[-2000:]


def test_set_triton_layer_norm(monkeypatch):
    monkeypatch.setattr(norm_mod, "_ENABLED", False)
    set_triton_layer_norm(True)
    assert norm_mod.triton_layer_norm_enabled() == triton_available()
    set_triton_layer_norm(False)
    assert not norm_mod.triton_layer_norm_enabled()


def test_a_failing_kernel_warns_and_falls_back(monkeypatch):
    # where the kernel would run (CUDA inference, enabled) but cannot build: the plain op, a warning, and
    # the kernel stays off for later calls
    monkeypatch.setattr(LayerNorm, "_kernel_ok", lambda self, x: norm_mod._ENABLED)
    monkeypatch.setattr(norm_mod, "_ENABLED", True)

    def broken(*a, **k):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(norm_mod, "triton_layer_norm", broken)
    norm = LayerNorm(16)
    x = torch.randn(3, 16)
    with pytest.warns(RuntimeWarning, match="Triton layer-norm kernel failed.*no kernel here"):
        y = norm(x)
    torch.testing.assert_close(y, F.layer_norm(x, (16,), norm.weight, norm.bias), rtol=0, atol=0)
    assert not norm_mod._ENABLED


def test_model_norms_are_ours_and_set_fast_reaches_them():
    m = create_model("davit_tiny", num_classes=10)
    norms = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    assert norms and all(isinstance(n, LayerNorm) for n in norms)
    # the norms that feed a linear/conv only may be written in autocast's dtype; stem and head keep fp32
    assert not m.stem.norm.autocast_out and not m.head.norm.autocast_out
    assert sum(n.autocast_out for n in norms) == len(norms) - 2
    m.set_fast(False)
    assert not any(n.fast for n in norms)


_INTERPRETED = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from davit.layers.norm import triton_layer_norm
    torch.manual_seed(0)
    cases = [((3, 5, 7, 96), torch.float32, None), ((37, 192), torch.bfloat16, torch.float32),
             ((2, 9, 384), torch.float32, torch.bfloat16), ((4, 768), torch.float16, None),
             ((5, 1000), torch.float32, None), ((1, 1, 1, 8), torch.float32, None)]
    for shape, dt, out in cases:
        x = (torch.randn(shape) * 3 + 1).to(dt)
        w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
        y = triton_layer_norm(x, w, b, 1e-5, out)
        ref = F.layer_norm(x.float(), (shape[-1],), w, b, 1e-5)
        assert y.shape == x.shape and y.dtype == (out or dt), (shape, y.dtype)
        # fp32 out: round-off; low-precision out: one unit in the last place (the interpreter truncates
        # to bf16 where the GPU rounds to nearest even, see test_cuda_matches_plain_op)
        tol = 1e-5 if y.dtype == torch.float32 else 2 * torch.finfo(y.dtype).eps * ref.abs().max().item()
        err = (y.float() - ref).abs().max().item()
        assert err <= tol, (shape, dt, out, err, tol)
    # no rows
    assert triton_layer_norm(torch.randn(0, 7, 32), torch.ones(32), torch.zeros(32), 1e-5).shape == (0, 7, 32)
    # a non-contiguous input (every other row)
    x = torch.randn(10, 64)[::2]
    y = triton_layer_norm(x, torch.ones(64), torch.zeros(64), 1e-5)
    assert (y - F.layer_norm(x, (64,))).abs().max().item() <= 1e-5
    print("ok")
    """
)


@needs_triton
def test_kernel_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@needs_triton
@pytest.mark.parametrize("out", ["bf16", "fp32"])
def test_kernel_compiles_for_hopper(out):
    """Without a GPU: Triton compiles the kernel for sm_90 (H100/H200) to PTX and a cubin (its own ptxas),
    with the argument specialisations a launch at C = 96 gets (pointers and sizes divisible by 16). The PTX
    shows what the kernel relies on: 16-byte loads/stores of the rows and round-to-nearest-even bf16
    conversion (the cast autocast would do)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # pragma: no cover - another Triton layout
        pytest.skip(f"this Triton has no offline compile API: {e}")
    kernel, _ = norm_mod._kernel()
    sig = {"X": "*fp32", "W": "*fp32", "B": "*fp32", "Y": f"*{out}", "M": "i32", "N": "i32",
           "stride_x": "i32", "stride_y": "i32", "eps": "fp32",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5, 6, 7)}
    consts = {"BLOCK_M": 32, "BLOCK_N": 128}
    try:
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    except TypeError as e:  # pragma: no cover - another Triton's signature
        pytest.skip(f"this Triton's ASTSource differs: {e}")
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = k.asm["ptx"]
    assert k.asm.get("cubin")
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, "row loads/stores not vectorised"
    assert ("cvt.rn.bf16x2.f32" in ptx) == (out == "bf16")


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_plain_op(dtype, monkeypatch):
    monkeypatch.setattr(norm_mod, "_ENABLED", True)
    torch.manual_seed(0)
    norm = LayerNorm(96, autocast_out=True).cuda()
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = (torch.randn(8, 56, 56, 96, device="cuda") * 2 + 1).to(dtype)
    def same_rounding(y: torch.Tensor, ref: torch.Tensor) -> None:
        # bf16 output rounded to nearest even as a cast of the fp32 result: equal but where the fp32 sums,
        # taken in another order, land on the other side of a rounding boundary (then one unit apart)
        assert (y != ref.to(y.dtype)).float().mean().item() < 1e-3
        torch.testing.assert_close(y.float(), ref, rtol=2**-7, atol=1e-6)

    with torch.inference_mode():
        ref = F.layer_norm(x.float(), (96,), norm.weight, norm.bias, norm.eps)
        y = norm(x)
        assert y.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
        else:
            same_rounding(y, ref)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = norm(x)
        assert y.dtype == torch.bfloat16
        same_rounding(y, ref)
        norm.autocast_out = False
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert norm(x).dtype == torch.float32
    assert norm_mod._ENABLED  # the kernel ran: no fallback


@needs_cuda
def test_cuda_training_uses_the_plain_op_with_gradients():
    norm = LayerNorm(64, autocast_out=True).cuda()
    x = torch.randn(4, 64, device="cuda", requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


@pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler: no native kernels")
def test_eager_cpu_training_forks_each_blocks_norms(monkeypatch):
    """Eager CPU fp32 training runs both norms of every block as LayerNorm.fork (one function: the native
    norm, and a backward that adds the stream's skip gradient), with the outputs and gradients of the plain
    pair and of the reference path; inference, compiled code, a hooked norm (whose hook fires) and the
    setting off keep the plain pair."""
    torch.manual_seed(0)
    model = create_model("davit_atto", num_classes=7).train()
    norms = [m for m in model.modules() if isinstance(m, LayerNorm) and m.normalized_shape[0] % 16 == 0]
    calls = []
    real = norm_mod._ForkNorm.apply
    monkeypatch.setattr(norm_mod._ForkNorm, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(2, 3, 45, 33)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = step()
    forks = len(calls)
    assert forks == 2 * sum(type(m).__name__.endswith("Block") for m in model.modules())
    assert forks <= len(norms)
    previous = norm_mod.set_fork_norm(False)
    try:
        plain = step()
    finally:
        norm_mod.set_fork_norm(previous)
    model.set_fast(False)
    try:
        ref = step()
    finally:
        model.set_fast(True)
    assert len(calls) == forks
    for o, g in (plain, ref):
        torch.testing.assert_close(out, o, atol=1e-5, rtol=1e-5)
        for a, r in zip(grads, g):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        model(x)
    torch.compile(model, backend="eager", fullgraph=True)(x).sum().backward()
    assert len(calls) == forks
    seen = []
    first = next(m for m in model.modules() if hasattr(m, "norm1"))
    handle = first.norm1.register_forward_hook(lambda *a: seen.append(1))
    try:
        step()
    finally:
        handle.remove()
    assert seen == [1] and len(calls) == 2 * forks - 1


def test_fork_returns_the_stream_itself_and_its_norm():
    norm = LayerNorm(32)
    x = torch.randn(3, 5, 32, requires_grad=True)
    s, n = norm.fork(x * 1)
    assert torch.equal(s, x * 1)
    torch.testing.assert_close(n, F.layer_norm(x, (32,), norm.weight, norm.bias, norm.eps))
    with torch.no_grad():
        base = x * 1
        s, n = norm.fork(base)
        assert s is base
