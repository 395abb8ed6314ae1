import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from davit import create_model
from davit.tasks.seg_data import SegFolder, SegMetric
from davit.tasks.segmentation import rescale_size, segment_inference, upernet
from davit.weights import from_native

SMALL = dict(channels=16, aux_channels=8, drop_path_rate=0.0, backbone_kwargs=dict(stem_stride=4))


def test_upernet_shapes_and_heads():
    m = upernet("davit_atto", num_classes=5, **SMALL).eval()
    assert len(m.decode_head.pools) == 4  # pool scales 1, 2, 3, 6
    assert [p[0].output_size for p in m.decode_head.pools] == [1, 2, 3, 6]
    assert m.aux_head.conv[0].in_channels == 128  # stage 3 of davit_atto
    with torch.no_grad():
        assert m(torch.randn(2, 3, 64, 80)).shape == (2, 5, 64, 80)
    labels = torch.randint(0, 5, (2, 64, 80))
    losses = m.train().loss(torch.randn(2, 3, 64, 80), labels)
    assert set(losses) == {"loss_decode", "loss_aux", "loss"}
    torch.testing.assert_close(losses["loss"], losses["loss_decode"] + losses["loss_aux"])
    assert upernet("davit_atto", num_classes=5, aux_weight=0, **SMALL).aux_head is None


def test_aux_loss_weight_is_0_4():
    m = upernet("davit_atto", num_classes=3, **SMALL).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))  # BatchNorm needs 2 in training
    torch.manual_seed(0)
    w = m.loss(x, y)["loss_aux"]
    m.aux_weight = 1.0
    torch.manual_seed(0)
    assert math.isclose(w.item(), 0.4 * m.loss(x, y)["loss_aux"].item(), rel_tol=1e-5)


@pytest.mark.slow
def test_training_steps_decrease_loss():
    torch.manual_seed(0)
    y = torch.zeros(2, 64, 64, dtype=torch.long)  # blocks of classes, marked in the image channels
    y[:, 32:, :] = 1
    y[:, :, 40:] = 2
    x = torch.randn(2, 3, 64, 64) + 2 * nn.functional.one_hot(y, 3).permute(0, 3, 1, 2)
    y[:, :4] = 255  # ignored pixels take no part
    m = upernet("davit_atto", num_classes=3, **SMALL).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def loss():
        torch.manual_seed(1)  # same dropout masks
        return m(x, y)["loss"]

    first = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.85 * first


def test_miou_hand_checked():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    m = SegMetric(num_classes=4)
    m.update(pred, target)
    r = m.compute()
    # 7 valid pixels (the 255 one is left out of truth and prediction alike)
    # class 0: truth 2, pred 2 ((0,0), (1,1)), inter 1 -> union 3 -> 1/3
    # class 1: truth 3, pred 4, inter 3 -> 3/4; class 2: truth 2, pred 1, inter 1 -> 1/2
    # class 3: absent from both -> NaN, left out of the mean
    assert r["IoU"][:3] == pytest.approx([1 / 3, 3 / 4, 1 / 2]) and math.isnan(r["IoU"][3])
    assert r["mIoU"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert r["aAcc"] == pytest.approx(5 / 7)
    assert r["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="num_classes"):
        m.update(torch.tensor([0]), torch.tensor([7]))


class _PixelModel(nn.Module):  # a pointwise model: windows must not change its output
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_slide_and_flip_inference_match_whole_for_pointwise_model():
    model, x = _PixelModel(), torch.randn(1, 3, 50, 70)
    whole = segment_inference(model, x)
    slide = segment_inference(model, x, mode="slide", crop=32, stride=20)
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(segment_inference(model, x, flip=True), whole)
    ms = segment_inference(model, x, scales=(0.5, 1.0, 1.5))
    assert ms.shape == whole.shape and torch.allclose(ms.sum(1), torch.ones(1, 50, 70))
    with pytest.raises(ValueError, match="mode"):
        segment_inference(model, x, mode="tiles")


def test_inference_rescales_to_the_test_scale_and_answers_at_input_size():
    seen = []

    class Spy(_PixelModel):
        def forward(self, x):
            seen.append(tuple(x.shape[2:]))
            return super().forward(x)

    x = torch.randn(1, 3, 50, 70)
    out = segment_inference(Spy(), x, scales=(1.0, 1.5), scale=(2048, 100))
    assert seen == [(100, 140), (150, 210)] and out.shape[2:] == (50, 70)
    seen.clear()
    segment_inference(Spy(), x, scales=(0.5,))  # without `scale`: ratios of the input size
    assert seen == [(25, 35)]


def test_rescale_fits_long_and_short_side_whatever_the_orientation():
    """mmseg's keep-ratio rescale to (2048, 512): the short side goes to 512 unless the long one would pass
    2048; torchvision's ScaleJitter((512, 2048)) gave a landscape 683 x 512 image 512 x 384."""
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)  # (h, w) landscape: unchanged
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)  # portrait
    assert rescale_size(256, 341, (2048, 512)) == (512, 682)
    assert rescale_size(300, 2500, (2048, 512)) == (246, 2048)  # the long side binds
    assert rescale_size(256, 341, (2048, 512), 0.5) == (256, 341)
    assert rescale_size(128, 128, (64, 64), 1.5) == (96, 96)


def test_segfolder_training_rescale_keeps_orientation(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(tmp_path / "ann" / "a.png")
    # ratio 1, a crop larger than the image: the sample is the rescaled image itself (then padded)
    ds = SegFolder(tmp_path / "img", tmp_path / "ann", train=True, crop_size=500, scale=(2048, 80),
                   ratio_range=(1.0, 1.0), flip_prob=0, photometric=False)  # fmt: skip
    x, y = ds[0]
    # 40 x 60 -> short side 80: 80 x 120, the rest of the 500 px crop is padding (labels 255)
    assert ((y != 255).sum(0) > 0).sum() == 120 and ((y != 255).sum(1) > 0).sum() == 80


def test_segfolder_refuses_labels_beyond_num_classes(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.array([[0, 4, 255, 1] * 2] * 8, np.uint8)).save(tmp_path / "ann" / "a.png")
    assert SegFolder(tmp_path / "img", tmp_path / "ann", num_classes=5)[0][1].max() == 255  # 255: ignored
    with pytest.raises(ValueError, match=r"a\.png holds class 4, but num_classes is 4.*at least 5"):
        SegFolder(tmp_path / "img", tmp_path / "ann", num_classes=4)[0]


def test_segfolder_reduce_zero_label_and_crop(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    Image.fromarray(np.array([[0, 1, 2, 255] * 15] * 40, np.uint8)).save(tmp_path / "ann" / "a.png")
    ds = SegFolder(tmp_path / "img", tmp_path / "ann", reduce_zero_label=True)
    x, y = ds[0]
    assert x.shape == (3, 40, 60) and y.shape == (40, 60)
    assert y[0, :4].tolist() == [255, 0, 1, 255]
    tr = SegFolder(tmp_path / "img", tmp_path / "ann", train=True, crop_size=48, scale=(60, 40))
    x, y = tr[0]
    assert x.shape == (3, 48, 48) and y.shape == (48, 48)
    assert set(y.unique().tolist()) <= {0, 1, 2, 255}  # padding is ignored (255), values stay labels


def test_segfolder_normalisation_and_cache(tmp_path):
    """The image is ImageNet-normalised as v2.ToDtype(scale=True) + v2.Normalize would; the cache returns
    the same samples (same RNG, same augmentation) without reading the files again."""
    from torchvision.transforms import v2

    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.array([[0, 1, 2, 3] * 15] * 40, np.uint8)).save(tmp_path / "ann" / "a.png")
    x, _ = SegFolder(tmp_path / "img", tmp_path / "ann")[0]
    ref = v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
        torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    )
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    kw = dict(train=True, crop_size=32, scale=(60, 40), ratio_range=(0.75, 1.5))
    plain = SegFolder(tmp_path / "img", tmp_path / "ann", **kw)
    cached = SegFolder(tmp_path / "img", tmp_path / "ann", cache=True, **kw)
    for seed in range(4):  # the first call fills the cache, the others read it: the same samples throughout
        torch.manual_seed(seed)
        xa, ya = plain[0]
        torch.manual_seed(seed)
        xb, yb = cached[0]
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xb.shape == (3, 32, 32)
    (tmp_path / "img" / "a.png").unlink()  # the cached dataset no longer needs the file
    assert cached[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError):
        plain[0]


def test_mmseg_checkpoint_loads_into_backbone():
    body = create_model("davit_atto", features_only=True, out_norm=True)
    native = {k: torch.randn_like(v) for k, v in body.state_dict().items()}
    mm = from_native(native, "mm")
    mm["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1)
    m = upernet("davit_atto", num_classes=150, backbone_weights=mm, channels=16, aux_channels=8)
    got = m.backbone.state_dict()
    for k, v in native.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
