"""build_mixup: the right mixup function and loss for each setting; odd batches (after dropped files) work."""

import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from davit.data import BatchMixup, build_mixup


def test_choices():
    fn, loss = build_mixup(0.8, 1.0, 0.1, 10)
    assert isinstance(fn, BatchMixup) and isinstance(loss, SoftTargetCrossEntropy)
    assert (fn.mixup_alpha, fn.cutmix_alpha, fn.label_smoothing, fn.switch_prob) == (0.8, 1.0, 0.1, 0.5)
    fn, loss = build_mixup(0.0, 0.0, 0.1, 10)
    assert fn is None and isinstance(loss, LabelSmoothingCrossEntropy) and loss.smoothing == 0.1
    fn, loss = build_mixup(0.8, 0.0, 0.0, 10, prob=0.0)
    assert fn is None and type(loss) is nn.CrossEntropyLoss


@pytest.mark.parametrize("n", [1, 5, 6])
def test_odd_and_even_batches(n):
    fn, loss = build_mixup(0.8, 1.0, 0.1, 4)
    torch.manual_seed(0)
    x, y = torch.rand(n, 3, 8, 8), torch.arange(n) % 4
    xm, ym = fn(x.clone(), y)
    assert xm.shape == x.shape and ym.shape == (n, 4)
    assert torch.allclose(ym.sum(1), torch.ones(n)) and (ym >= 0).all()
    assert torch.isfinite(loss(torch.randn(n, 4), ym))


def test_bad_arguments():
    with pytest.raises(ValueError, match="smoothing"):
        build_mixup(0.8, 1.0, 1.0, 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_mixup(0.8, 1.0, 0.1, 0)
