import pytest
import torch
from safetensors.torch import save_file

from davit import create_model
from davit.tasks.coco import CocoInstances, coco_evaluate, coco_results
from davit.tasks.detection import DaViTFPN, detector_param_groups, maskrcnn
from davit.weights import from_native

SMALL = dict(
    fpn_channels=32,
    box_head_dim=64,
    mask_head_channels=16,
    min_size=64,
    max_size=64,
    box_batch_size_per_image=32,
    rpn_batch_size_per_image=32,
    rpn_post_nms_top_n_train=100,
    drop_path_rate=0.0,
)


def test_backbone_features_and_fpn_wiring():
    body = create_model("davit_tiny", features_only=True, out_norm=True)
    assert body.feature_info.channels() == [96, 192, 384, 768]
    assert body.feature_info.reduction() == [4, 8, 16, 32]
    neck = DaViTFPN(body, 256).eval()
    assert [b[0].in_channels for b in neck.fpn.inner_blocks] == [96, 192, 384, 768]
    assert neck.strides == [4, 8, 16, 32, 64]
    with torch.no_grad():
        feats = body(torch.randn(1, 3, 64, 96))
        out = neck(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, 96, 16, 24),
        (1, 192, 8, 12),
        (1, 384, 4, 6),
        (1, 768, 2, 3),
    ]
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape) for f in out.values()] == [
        (1, 256, 16, 24),
        (1, 256, 8, 12),
        (1, 256, 4, 6),
        (1, 256, 2, 3),
        (1, 256, 1, 2),
    ]


def test_small_variant_strides_and_anchors():
    m = maskrcnn("davit_atto", num_classes=11, **SMALL)
    assert m.backbone.strides == [2, 4, 8, 16, 32]  # stem stride 2
    assert m.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))  # 8 x stride, as mmdet
    m4 = maskrcnn("davit_atto", num_classes=11, backbone_kwargs=dict(stem_stride=4), **SMALL)
    assert m4.backbone.strides == [4, 8, 16, 32, 64]
    assert m4.roi_heads.box_predictor.cls_score.out_features == 11


def _randomised_backbone_state():
    body = create_model("davit_atto", features_only=True, out_norm=True)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in body.state_dict().items()}


def test_mmdet_checkpoint_loads_into_backbone(tmp_path):
    native = _randomised_backbone_state()
    mm = from_native(native, "mm")  # backbone.patch_embeds.*, backbone.main_blocks.*, backbone.norm{i}.*
    assert "backbone.norm3.weight" in mm and "backbone.patch_embeds.0.proj.weight" in mm
    mm["neck.lateral_convs.0.conv.weight"] = torch.randn(256, 32, 1, 1)  # detector parts are ignored
    mm["rpn_head.rpn_conv.weight"] = torch.randn(256, 256, 3, 3)
    torch.save({"state_dict": mm}, tmp_path / "mask_rcnn_davit.pth")
    m = maskrcnn("davit_atto", num_classes=11, backbone_weights=tmp_path / "mask_rcnn_davit.pth", **SMALL)
    got = m.backbone.body.state_dict()
    assert set(got) == set(native)
    for k, v in native.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def test_classification_checkpoint_loads_into_backbone(tmp_path):
    clf = create_model("davit_atto", num_classes=10)
    sd = {k: torch.randn_like(v) for k, v in clf.state_dict().items()}
    save_file(sd, str(tmp_path / "clf.safetensors"))
    m = maskrcnn("davit_atto", num_classes=11, backbone_weights=tmp_path / "clf.safetensors", **SMALL)
    got = m.backbone.body.state_dict()
    for k, v in sd.items():
        if not k.startswith("head."):
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    assert torch.equal(got["out_norms.0.weight"], torch.ones(32))  # fresh output norms keep their init


@pytest.mark.slow
def test_training_steps_decrease_loss(scenes):
    ds = CocoInstances(
        scenes / "images" / "train", scenes / "annotations" / "instances_train.json", train=False
    )
    images, targets = zip(*[ds[i] for i in range(2)])
    stride4 = dict(stem_stride=4)
    m = maskrcnn("davit_atto", num_classes=ds.num_classes, backbone_kwargs=stride4, **SMALL).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

    def loss():  # the same RPN/RoI sampling each time
        torch.manual_seed(0)
        return sum(m(list(images), list(targets)).values())

    first = loss()
    for _ in range(4):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        assert loss().item() < 0.8 * first.item()


def test_coco_evaluation_perfect_and_empty(scenes):
    ds = CocoInstances(scenes / "images" / "val", scenes / "annotations" / "instances_val.json")
    outs, ids = [], []
    for i in range(len(ds)):  # perfect predictions made from the targets, through the result converter
        _, t = ds[i]
        outs.append(
            dict(
                boxes=t["boxes"],
                labels=t["labels"],
                scores=torch.ones(len(t["labels"])),
                masks=t["masks"][:, None].float(),
            )
        )
        ids.append(int(t["image_id"]))
    perfect = coco_evaluate(ds.coco, coco_results(outs, ids))
    for k in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"):
        assert perfect[k] == 1.0, k
    empty = coco_evaluate(ds.coco, [])
    for k in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
        assert empty[k] == 0.0, k
    # a wrong class everywhere scores 0 too: evaluation really compares categories
    wrong = [dict(o, labels=o["labels"] % 10 + 1) for o in outs]
    assert coco_evaluate(ds.coco, coco_results(wrong, ids))["box_AP"] == 0.0


def test_resize_crop_policy_keeps_boxes_and_masks_on_the_crop(scenes):
    """The official pipeline's second policy: short side 400/500/600, a 384..600 crop; boxes shifted and
    clipped to the crop, masks cut the same way, boxes left empty dropped with their label and mask."""
    args = (scenes / "images" / "train", scenes / "annotations" / "instances_train.json")
    ds = CocoInstances(*args, train=True, flip_prob=0.0, crop_prob=1.0)
    plain = CocoInstances(*args, train=True, flip_prob=0.0)
    sizes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        img, t = ds[seed % len(ds)]
        h, w = img.shape[1:]
        sizes.add((h, w))
        # 64 px scenes go to a 400-600 px short side, then a window of 384..600 per side (at most the image)
        assert 384 <= h <= 600 and 384 <= w <= 600
        assert t["masks"].shape[1:] == (h, w) and len(t["masks"]) == len(t["boxes"]) == len(t["labels"])
        b = t["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)).all()
        for m, box in zip(t["masks"], b.round().long()):  # each mask lies inside its (clipped) box
            ys, xs = torch.nonzero(m, as_tuple=True)
            if len(ys):
                assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.max() <= box[3]
    assert len(sizes) > 1  # random sizes
    assert plain[0][0].shape[1:] == (64, 64)  # crop_prob 0: untouched


def test_param_groups_decay_every_parameter_as_the_official_configs():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    (g,) = detector_param_groups(m, 0.05)
    assert len(g["params"]) == 4 and g["weight_decay"] == 0.05
    decay, no_decay = detector_param_groups(m, 0.05, decay_1d=False)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_coco_results_leaves_the_callers_boxes_alone():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 50.0], [0.0, 0.0, 4.0, 2.0]])  # float on the CPU: no copy made
    before = boxes.clone()
    out = dict(boxes=boxes, scores=torch.tensor([0.9, 0.8]), labels=torch.tensor([1, 2]))
    res = coco_results([out], [7])
    assert [r["bbox"] for r in res] == [[10.0, 20.0, 20.0, 30.0], [0.0, 0.0, 4.0, 2.0]]  # xywh
    torch.testing.assert_close(boxes, before)  # still xyxy: evaluating twice must give the same boxes
    assert [r["bbox"] for r in coco_results([out], [7])] == [r["bbox"] for r in res]
