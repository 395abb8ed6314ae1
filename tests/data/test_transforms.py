"""Train/eval transforms give the expected tensors for 1 and 3 channels; RandAugment works on grey images;
the batched uint8 augmentation matches its per-image rules."""

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

from davit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, build_batch_transform, build_transform
from davit.data.transforms import _safe_posterize

RA = "rand-m9-mstd0.5-inc1"


def img(mode, size=(37, 29)):
    c = 1 if mode == "L" else 3
    a = np.random.default_rng(0).integers(0, 255, (size[1], size[0], c), np.uint8)
    return Image.fromarray(a[..., 0] if c == 1 else a, mode)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("simple", [False, True])
@pytest.mark.parametrize("is_training", [False, True])
def test_shapes(in_chans, simple, is_training):
    mode = "L" if in_chans == 1 else "RGB"
    tf = build_transform(
        is_training,
        24,
        in_chans=in_chans,
        aa=RA if is_training else None,
        reprob=0.25 if is_training else 0.0,
        simple=simple,
    )
    for size in ((37, 29), (1, 1), (24, 24)):
        x = tf(img(mode, size))
        assert x.shape == (in_chans, 24, 24) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_imagenet_eval_is_resize_then_center_crop():
    tf = build_transform(False, 224, crop_pct=0.9, interpolation="bicubic")
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:2] == ["Resize", "CenterCrop"] and tf.transforms[0].size == 248  # floor(224 / 0.9)
    x = tf(img("RGB", (300, 260)))
    assert x.shape == (3, 224, 224)


def test_grey_randaugment_many_draws():
    """Every RandAugment op on an L image at the recipe's magnitude (and its noise) runs; a posterize with 0
    bits (magnitude noise reaching 10) used to crash under Pillow >= 11."""
    tf = build_transform(
        True, 28, in_chans=1, aa=RA, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, simple=True
    )
    ra = tf.transforms[3]
    assert type(ra).__name__ == "RandAugment"
    assert any(op.aug_fn is _safe_posterize for op in ra.ops)
    grey = img("L", (28, 28))
    for op in ra.ops:  # each op alone, at the largest magnitude the noise can reach
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
        assert op(grey).mode == "L"
    black = _safe_posterize(grey, 0)
    assert np.asarray(black).max() == 0
    assert np.array_equal(np.asarray(_safe_posterize(grey, 4)), np.asarray(timm_aa.posterize(grey, 4)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_chans=1"):
        build_transform(True, 28, in_chans=1, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="crop_pct"):
        build_transform(False, 28, crop_pct=1.5)


def test_batch_transform():
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    ev = build_batch_transform(False, 28, (0.5,), (0.25,))
    assert torch.allclose(ev(x), (x.float() / 255 - 0.5) / 0.25, atol=1e-5)
    tr = build_batch_transform(True, 28, (0.0,), (1 / 255,), padding=2, hflip=0.5)
    torch.manual_seed(0)
    y = tr(x)
    assert y.shape == (6, 1, 28, 28)
    for i in range(6):  # each output is a 28x28 window of the zero-padded image, maybe mirrored
        padded = torch.nn.functional.pad(x[i, 0].float(), (2, 2, 2, 2))
        windows = [padded[a : a + 28, b : b + 28] for a in range(5) for b in range(5)]
        assert any(torch.equal(y[i, 0], w) or torch.equal(y[i, 0], w.flip(1)) for w in windows)
    torch.manual_seed(0)
    assert torch.equal(tr(x), y)  # randomness only from the (loader-seeded) global RNG
    assert build_batch_transform(True, 32, (0.5,) * 3, (0.5,) * 3)(x.expand(-1, 3, -1, -1)).shape == (
        6,
        3,
        32,
        32,
    )
    with pytest.raises(TypeError, match="uint8"):
        tr(x.float())
