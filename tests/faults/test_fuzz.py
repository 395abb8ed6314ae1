"""hypothesis: input sizes, batches, channels, dtypes (forward, features_only); conflicting CLI flags."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from faultkit import FMNIST_ARGS, TINY_ARGS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import davit
from davit.cli import main

# davit_atto cut to one block of 16 channels per stage: sizes up to 600 px stay fast on 2 cores
ARCH = dict(depths=[1, 1, 1, 1], embed_dims=[16, 16, 16, 16], num_heads=[1, 1, 1, 1])
DTYPES = {
    "float32": (torch.float32, 1e-4),
    "bfloat16": (torch.bfloat16, 0.1),
    "float64": (torch.float64, 1e-9),
}


@functools.cache
def _models(c: int, dt: str):
    torch.manual_seed(0)
    m = davit.create_model("davit_atto", num_classes=7, in_chans=c, **ARCH).eval().to(DTYPES[dt][0])
    f = davit.create_model("davit_atto", features_only=True, in_chans=c, **ARCH).eval().to(DTYPES[dt][0])
    return m, f


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(
    h=st.integers(1, 600),
    w=st.integers(1, 600),
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    dt=st.sampled_from(sorted(DTYPES)),
)
def test_forward_any_shape(h, w, b, c, dt):
    dtype, tol = DTYPES[dt]
    m, f = _models(c, dt)
    x = torch.randn(b, c, h, w).to(dtype)
    with torch.no_grad():
        y = m(x)
        feats = f(x)
        y0 = m(x[:1])
    assert y.shape == (b, 7) and y.dtype == dtype and torch.isfinite(y).all()
    # samples do not leak into each other: the first row alone gives the same logits
    assert torch.allclose(y[:1].float(), y0.float(), atol=tol, rtol=tol)
    assert len(feats) == 4
    for o, ch, r in zip(feats, f.feature_info.channels(), f.feature_info.reduction()):
        assert o.shape == (b, ch, math.ceil(h / r), math.ceil(w / r)), (o.shape, h, w, r)
        assert torch.isfinite(o).all()


# flags that conflict with each other or with the tiny Fashion-MNIST run; any subset must end with a clear
# error (exit 2, "davit train: error: ...") or a finished run, never a traceback
FLAGS = [
    ["--batch-aug"],
    ["--dataset", "folder"],
    ["--fsdp"],
    ["--model-ema"],
    ["--mixup", "0.8"],
    ["--grad-accum-steps", "0"],
    ["-b", "0"],
    ["--epochs", "0"],
    ["--lr", "-1"],
    ["--aa", "rand-m9-mstd0.5"],
    ["--device", "cuda"],
    ["--train-samples", "3"],
    ["--img-size", "0"],
    ["--keep-last", "0"],
    ["--checkpoint-every-steps", "-1"],
    ["--smoothing", "1.5"],
    ["--in-chans", "3"],
    ["--num-classes", "3"],
    ["--resume", "/nonexistent/ckpt.pt"],
    ["--time-budget", "-5"],
]


@pytest.mark.slow
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.lists(st.integers(0, len(FLAGS) - 1), min_size=1, max_size=3, unique=True))
def test_conflicting_cli_flags(pick, tmp_path, capsys):
    extra = [a for i in pick for a in FLAGS[i]]
    argv = ["train", *TINY_ARGS, *FMNIST_ARGS, "--max-steps", "1", "--output", str(tmp_path / "r"), *extra]
    rc = main(argv)  # an unhandled exception fails the test with its traceback
    err = capsys.readouterr().err
    assert rc in (0, 2), (extra, rc, err)
    if rc == 2:
        assert "davit train: error:" in err and len(err.strip()) > 30, (extra, err)
