"""The model's paths on every device this machine has: the CPU always, a CUDA GPU when there is one.

On CUDA these check what no CPU test can: the fast path (SDPA kernels, batched channel attention, the Triton
layer norm) against the reference formulation in true fp32 (TF32 off), bf16 autocast, a training step, and an
inductor compile. benchmarks/device_run.sh runs them first on a lent GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import davit
from davit.bench import full_fp32
from davit.layers import norm as norm_mod

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(name: str, device: str) -> torch.nn.Module:
    kw = dict(depths=(1, 1, 1, 1)) if name == "davit_base_fl" else {}
    return davit.create_model(name, **kw).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name,hw", [("davit_atto", (32, 32)), ("davit_atto", (23, 41)), ("davit_base_fl", (50, 70))]
)
def test_fast_path_equals_reference_in_fp32(device, name, hw):
    # odd sizes (window padding, one-window maps) and both channel-attention versions (Florence-2 tower: V2)
    m = _model(name, device)
    x = torch.randn(2, 3, *hw, device=device)
    with full_fp32():
        fast = m(x)
        g_fast = torch.autograd.grad(fast.square().mean(), list(m.parameters()))
        m.set_fast(False)
        ref = m(x)
        g_ref = torch.autograd.grad(ref.square().mean(), list(m.parameters()))
    assert (fast - ref).abs().max().item() <= 1e-4
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_inference_and_training_step(device):
    m = _model("davit_atto", device)
    x = torch.randn(4, 3, 64, 64, device=device)
    m.eval()
    with torch.inference_mode():
        with full_fp32():
            ref = m(x)
        with torch.autocast(device, dtype=torch.bfloat16):
            low = m(x).float()
    assert torch.isfinite(low).all()
    assert ((low - ref).norm() / ref.norm()).item() < 3e-2
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    y = torch.randint(0, m.num_classes, (4,), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = F.cross_entropy(m(x).float(), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    opt.step()


@needs_cuda
def test_triton_layer_norm_in_the_model(monkeypatch):
    if not norm_mod.triton_available():
        pytest.skip("triton is not installed")
    m = _model("davit_tiny", "cuda").eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")

    def run(kernel: bool, amp: bool) -> torch.Tensor:
        monkeypatch.setattr(norm_mod, "_ENABLED", kernel)
        with torch.inference_mode(), full_fp32(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return m(x).float()

    assert ((run(True, False) - run(False, False)).abs().max().item()) <= 1e-4
    low, plain = run(True, True), run(False, True)
    assert ((low - plain).norm() / plain.norm()).item() < 1e-2
    assert norm_mod._ENABLED  # no fallback happened


@needs_cuda
def test_inductor_compile_on_cuda_fullgraph_dynamic_batch():
    m = _model("davit_atto", "cuda").eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    torch._dynamo.mark_dynamic(x, 0)
    compiled = torch.compile(m, fullgraph=True)
    with torch.inference_mode(), full_fp32():
        torch.testing.assert_close(compiled(x), m(x), atol=1e-4, rtol=1e-4)
        y = torch.randn(5, 3, 64, 64, device="cuda")
        torch.testing.assert_close(compiled(y), m(y), atol=1e-4, rtol=1e-4)
