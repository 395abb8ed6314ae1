"""The DaViT trunk shared by the dense-prediction models (Mask R-CNN in detection.py, UperNet in
segmentation.py): the four normed stage outputs, optionally initialised from a checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..models import DaViTFeatures, create_model
from ..weights import load_weights

__all__ = ["dense_backbone"]


def dense_backbone(
    backbone: str,
    backbone_weights: str | os.PathLike | Mapping[str, Tensor] | None = None,
    drop_path_rate: float = 0.0,
    backbone_kwargs: dict[str, Any] | None = None,
) -> DaViTFeatures:
    """``backbone`` (a DaViT variant) with ``features_only`` over all four stages and the per-stage output
    norms of the official mmdet/mmseg configs.

    ``backbone_weights``: a classification checkpoint (official, timm, ours; head keys ignored) or an
    mmdet/mmseg one (``backbone.*``, ``backbone.norm{i}`` -> output norms), path or state dict; the trunk must
    match, output norms the checkpoint lacks keep their init, a stem with other input channels is adapted
    (e.g. the 1-channel Fashion-MNIST demo classifier). ``backbone_kwargs``: DaViT architecture
    overrides, e.g. ``dict(stem_stride=4)``."""
    body = create_model(
        backbone,
        features_only=True,
        out_indices=(0, 1, 2, 3),
        out_norm=True,
        drop_path_rate=drop_path_rate,
        **(backbone_kwargs or {}),
    )
    if backbone_weights is not None:
        # trunk must match; out norms may stay fresh; a grey classifier's stem is adapted to RGB
        load_weights(body, backbone_weights, strict=True, adapt_in_chans=True)
    return body
