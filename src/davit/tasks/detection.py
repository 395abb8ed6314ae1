"""Mask R-CNN (detection + instance segmentation) on a DaViT backbone, built from torchvision's parts.

Structure as in the official mmdet configs (SPEC section 6): the four normed DaViT stage outputs feed an
FPN with 256 channels plus a max-pool extra level (5 levels), then torchvision's standard RPN and
RoI box/mask heads. Anchors are 8 x the level stride with ratios (0.5, 1, 2), as mmdet's
``octave_base_scale=8``; for stride-4 stems that is torchvision's default (32 .. 512).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..models import DaViTFeatures
from .backbone import dense_backbone

__all__ = ["DaViTFPN", "maskrcnn", "RECIPE_MIN_SIZES"]

# the recipe's multi-scale training short sides (480..800, step 32) with the long side capped at 1333
RECIPE_MIN_SIZES = tuple(range(480, 801, 32))


class DaViTFPN(nn.Module):
    """DaViT stage maps -> FPN maps ``'0'..'3'`` plus ``'pool'`` (torchvision's BackboneWithFPN contract)."""

    def __init__(self, body: DaViTFeatures, out_channels: int = 256) -> None:
        super().__init__()
        if body.out_norms is None:
            raise ValueError(
                "the detection backbone needs the per-stage output norms: build it with out_norm=True"
            )
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels
        red = body.feature_info.reduction()
        self.strides = [*red, red[-1] * 2]  # the max-pool level halves the last map

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def maskrcnn(
    backbone: str = "davit_tiny",
    num_classes: int = 91,
    backbone_weights: str | os.PathLike | Mapping[str, Tensor] | None = None,
    *,
    drop_path_rate: float = 0.1,
    fpn_channels: int = 256,
    box_head_dim: int = 1024,
    mask_head_channels: int = 256,
    min_size: int | Sequence[int] = RECIPE_MIN_SIZES,
    max_size: int = 1333,
    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
    image_std: Sequence[float] = (0.229, 0.224, 0.225),
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """torchvision Mask R-CNN with a DaViT + FPN backbone.

    Args:
        backbone: DaViT variant (``davit.list_models()``).
        num_classes: including background: for COCO-style category ids use ``max(category id) + 1``.
        backbone_weights: a classification checkpoint (official, timm, ours; head keys ignored, output norms
            keep their init) or an mmdet/mmseg checkpoint (its ``backbone.*`` keys, ``backbone.norm{i}`` ->
            output norms), as a path or a state dict.
        drop_path_rate: stochastic depth of the backbone (recipe: 0.1 for 1x, 0.2 for 3x with DaViT-T).
        min_size / max_size: the model's internal resize. A sequence of short sides is drawn from at random in
            training (multi-scale training) and its last entry is used in evaluation.
        fpn_channels / box_head_dim / mask_head_channels: widths of the FPN, the two-FC box head and the four
            mask-head convs (recipe: 256 / 1024 / 256; the CPU demo shrinks them).
        backbone_kwargs: DaViT architecture overrides, e.g. ``dict(stem_stride=4)``.
        **kwargs: passed to :class:`torchvision.models.detection.MaskRCNN` (``box_detections_per_img``, ...).
    """
    body = dense_backbone(backbone, backbone_weights, drop_path_rate, backbone_kwargs)
    neck = DaViTFPN(body, fpn_channels)
    if "rpn_anchor_generator" not in kwargs:
        sizes = tuple((8 * s,) for s in neck.strides)
        kwargs["rpn_anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    # the heads torchvision would build, with our widths (MaskRCNN then wants num_classes=None)
    kwargs.setdefault("box_head", TwoMLPHead(fpn_channels * 7 * 7, box_head_dim))
    kwargs.setdefault("box_predictor", FastRCNNPredictor(box_head_dim, num_classes))
    kwargs.setdefault("mask_head", MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1))
    kwargs.setdefault(
        "mask_predictor", MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes)
    )
    if isinstance(min_size, int):
        min_size = (min_size,)
    return MaskRCNN(
        neck,
        num_classes=None,
        min_size=tuple(min_size),
        max_size=max_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        **kwargs,
    )


def detector_param_groups(
    model: nn.Module, weight_decay: float, decay_1d: bool = True
) -> list[dict[str, Any]]:
    """AdamW groups of a dense model: weight decay on every parameter, as the official DaViT mmdet and mmseg
    configs (no ``paramwise_cfg``), or with ``decay_1d=False`` none on norms, biases and other 1-D
    parameters (the classification recipe's rule)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and not decay_1d else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay)]
    return groups + ([dict(params=no_decay, weight_decay=0.0)] if no_decay else [])


@torch.no_grad()
def predict_images(model: MaskRCNN, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """Eval-mode forward of float images in [0, 1] (C, H, W); boxes in pixels, masks (N, 1, H, W) probs."""
    model.eval()
    return model(images)
