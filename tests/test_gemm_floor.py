"""The GEMM floor: which products a step is said to make, and that the replay makes exactly those."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from davit import create_model
from davit.gemm_floor import GemmReplay, TensorSpec, capture_model_gemms

aten = torch.ops.aten


def _toy() -> nn.Module:
    # a dense conv (image in: no input gradient), a depthwise conv (not a GEMM), a linear on (B, H, W, C)
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 2, stride=2)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.dw(self.stem(x)).permute(0, 2, 3, 1)).mean((1, 2))

    return Toy()


def _desc(calls) -> list[tuple]:
    return [(c.op, tuple(a.shape for a in c.args if isinstance(a, TensorSpec)), c.flops) for c in calls]


def test_toy_inference_and_training_calls():
    m, x = _toy(), torch.randn(2, 3, 8, 8)
    conv = 2.0 * (2 * 8 * 4 * 4) * (3 * 2 * 2)  # outputs x multiply-adds each
    lin = 2.0 * (2 * 4 * 4) * 8 * 5  # 32 tokens
    assert _desc(capture_model_gemms(m, x, train=False)) == [
        (aten.convolution.default, ((2, 3, 8, 8), (8, 3, 2, 2), (8,)), conv),
        (aten.addmm.default, ((5,), (32, 8), (8, 5)), lin),
    ]
    train = capture_model_gemms(m, x, train=True)
    # forward in order, then the backward in reverse: the linear's input and weight gradients, then the
    # stem's weight gradient only (its input, the image, needs none)
    assert _desc(train) == [
        (aten.convolution.default, ((2, 3, 8, 8), (8, 3, 2, 2), (8,)), conv),
        (aten.addmm.default, ((5,), (32, 8), (8, 5)), lin),
        (aten.mm.default, ((32, 5), (5, 8)), lin),
        (aten.mm.default, ((5, 32), (32, 8)), lin),
        (aten.convolution_backward.default, ((2, 8, 4, 4), (2, 3, 8, 8), (8, 3, 2, 2)), conv),
    ]
    assert train[-1].args[-1] == [False, True, True]
    assert train[3].args[0].stride == (1, 5)  # the weight gradient reads the output gradient transposed
    assert m.training and all(p.grad is None for p in m.parameters())  # mode kept, nothing accumulated


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (
            aten.mm.default,
            aten.addmm.default,
            aten.convolution.default,
            aten.convolution_backward.default,
        ):
            specs = tuple(
                (tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a
                for a in args
            )
            self.seen.append((func, specs))
        return out


def test_replay_calls_exactly_the_captured_ops():
    calls = capture_model_gemms(_toy(), torch.randn(2, 3, 8, 8), train=True)
    replay = GemmReplay(calls)
    with _Ops() as ops:
        replay()
    want = [
        (c.op, tuple((a.shape, a.stride, a.dtype) if isinstance(a, TensorSpec) else a for a in c.args))
        for c in calls
    ]
    assert ops.seen == want
    assert replay.flops == sum(c.flops for c in calls)
    with pytest.raises(ValueError, match="no GEMM calls"):
        GemmReplay([])


def test_davit_and_timm_make_the_same_gemms():
    """At 224 px (no window padding) the floor is the same for both ports: their linears and dense
    convolutions match call for call. Where windows are padded ours projects only the real tokens."""
    pytest.importorskip("timm")
    from davit.bench import timm_counterpart

    ours = create_model("davit_tiny", num_classes=10)
    peer = timm_counterpart("davit_tiny", 10)
    x = torch.randn(1, 3, 224, 224)
    for train in (False, True):
        a, b = capture_model_gemms(ours, x, train), capture_model_gemms(peer, x, train)
        assert sorted(map(repr, _desc(a))) == sorted(map(repr, _desc(b)))
        assert len(a) == (53 if not train else 155)
    # every linear once (49) and the 4 dense convolutions; training adds each linear's two gradient GEMMs and
    # each convolution's backward, whose input gradient all but the stem's need: 3x the forward, less one stem
    infer = capture_model_gemms(ours, x, False)
    stem = next(c.flops for c in infer if c.op is aten.convolution.default)
    total = sum(c.flops for c in infer)
    assert sum(c.flops for c in capture_model_gemms(ours, x, True)) == pytest.approx(3 * total - stem)
    # 64 px: 16 x 16 maps padded to 21 x 21 for the 7 x 7 windows; timm's output projections see the padding
    small = torch.randn(1, 3, 64, 64)
    ours_flops = sum(c.flops for c in capture_model_gemms(ours, small, False))
    assert ours_flops < sum(c.flops for c in capture_model_gemms(peer, small, False))


def test_capture_restores_the_models_settings():
    m = create_model("davit_atto").eval()
    m.set_inference_slices(1234)
    fast = [(mod, mod.fast) for mod in m.modules() if hasattr(mod, "fast")]
    fast[0][0].fast = False  # a mixed setting must come back as it was
    before = [mod.fast for mod, _ in fast]
    capture_model_gemms(m, torch.randn(1, 3, 32, 32), train=True)
    assert [mod.fast for mod, _ in fast] == before
    assert all(s.infer_chunk_tokens == 1234 for s in m.stages)
    assert not m.training
