"""UperNet semantic segmentation on a DaViT backbone (the official mmseg configs, SPEC section 6).

Decode head (UPerHead): pyramid pooling (scales 1, 2, 3, 6) on the last stage, 1x1 laterals on the others, a
top-down FPN pass, 3x3 convs, all levels upsampled to stride 4 (of the stem), concatenated and fused by a 3x3
conv, dropout 0.1, 1x1 classifier. Auxiliary FCN head on stage 3 (index 2), loss weight 0.4, training only.
Conv + BatchNorm + ReLU blocks come from torchvision; for DDP convert them with
``nn.SyncBatchNorm.convert_sync_batchnorm`` as the recipe's SyncBN.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from .backbone import dense_backbone

__all__ = [
    "UPerHead",
    "FCNHead",
    "UperNet",
    "upernet",
    "segment_inference",
    "rescale_size",
    "IGNORE_INDEX",
]

IGNORE_INDEX = 255


def _cbr(cin: int, cout: int, k: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(cin, cout, k, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, bias=False)


def _up(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _cbr(in_channels[-1], channels, 1)) for s in pool_scales
        )
        self.psp_bottleneck = _cbr(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(_cbr(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_cbr(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = _cbr(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(
        self, feats: Sequence[Tensor]
    ) -> Tensor:  # stage maps, fine to coarse -> logits at stride of feats[0]
        top = feats[-1]
        psp = [top] + [_up(p(top), top.shape[2:]) for p in self.pools]
        lat = [conv(f) for conv, f in zip(self.laterals, feats[:-1])] + [
            self.psp_bottleneck(torch.cat(psp, 1))
        ]
        for i in range(len(lat) - 1, 0, -1):  # top-down: each level gets the upsampled coarser one
            lat[i - 1] = lat[i - 1] + _up(lat[i], lat[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        outs = [outs[0]] + [_up(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.classifier(self.dropout(self.fpn_bottleneck(torch.cat(outs, 1))))


class FCNHead(nn.Module):
    """mmseg's auxiliary head: one 3x3 conv block (no input concat), dropout 0.1, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = _cbr(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class UperNet(nn.Module):
    """``forward(x)`` -> logits at input resolution; ``forward(x, labels)`` = ``loss(x, labels)`` -> dict of
    losses (decode + 0.4 aux, and their sum ``loss``)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        channels: int = 512,
        aux_channels: int = 256,
        aux_index: int = 2,
        aux_weight: float = 0.4,
        ignore_index: int = IGNORE_INDEX,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        chans = backbone.feature_info.channels()
        self.backbone = backbone
        self.decode_head = UPerHead(chans, num_classes, channels, dropout=dropout)
        self.aux_head = (
            FCNHead(chans[aux_index], num_classes, aux_channels, dropout=dropout) if aux_weight > 0 else None
        )
        self.aux_index, self.aux_weight, self.ignore_index = aux_index, aux_weight, ignore_index
        self.num_classes = num_classes

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        if labels is not None:
            return self.loss(x, labels)
        return _up(self.decode_head(self.backbone(x)), x.shape[2:])

    def loss(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Cross-entropy (ignore 255) of the logits upsampled to the label size, as mmseg."""
        if labels.ndim != 3 or labels.shape[0] != x.shape[0]:
            raise ValueError(f"labels must be (B, H, W) matching the batch, got {tuple(labels.shape)}")
        feats = self.backbone(x)
        ce = dict(ignore_index=self.ignore_index)
        out = {"loss_decode": F.cross_entropy(_up(self.decode_head(feats), labels.shape[1:]), labels, **ce)}
        if self.aux_head is not None:
            aux = _up(self.aux_head(feats[self.aux_index]), labels.shape[1:])
            out["loss_aux"] = self.aux_weight * F.cross_entropy(aux, labels, **ce)
        out["loss"] = sum(out.values())
        return out


def upernet(
    backbone: str = "davit_tiny",
    num_classes: int = 150,
    backbone_weights: str | os.PathLike | Mapping[str, Tensor] | None = None,
    *,
    drop_path_rate: float = 0.3,
    channels: int = 512,
    aux_channels: int = 256,
    aux_weight: float = 0.4,
    backbone_kwargs: dict[str, Any] | None = None,
    dropout: float = 0.1,
) -> UperNet:
    """UperNet with a DaViT backbone (four normed stage outputs).

    ``backbone_weights``: a classification checkpoint or an mmseg one (``backbone.*``), path or state dict.
    ``channels``: decode-head width (recipe 512; the CPU demo shrinks it). ``aux_weight=0`` drops the aux
    head. ``dropout``: before both heads' classifiers (mmseg's ``dropout_ratio``, recipe 0.1).
    """
    body = dense_backbone(backbone, backbone_weights, drop_path_rate, backbone_kwargs)
    return UperNet(body, num_classes, channels, aux_channels, aux_weight=aux_weight, dropout=dropout)


def rescale_size(h: int, w: int, scale: Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    """(h', w') of an h x w image rescaled keeping its aspect ratio so that its long side fits
    ``max(scale) * ratio`` and its short side ``min(scale) * ratio``, whatever its orientation: mmseg's
    ``Resize(img_scale=(2048, 512), keep_ratio=True)`` (mmcv ``imrescale``, sizes rounded half up)."""
    if h < 1 or w < 1:
        raise ValueError(f"cannot rescale an empty image ({h} x {w})")
    r = min(max(scale) * ratio / max(h, w), min(scale) * ratio / min(h, w))
    return max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5))


def _slide(model: nn.Module, x: Tensor, crop: int, stride: int) -> Tensor:
    """mmseg's sliding window: overlapping crop x crop windows, logits averaged where windows overlap."""
    b, _, h, w = x.shape
    gh, gw = max(h - crop + stride - 1, 0) // stride + 1, max(w - crop + stride - 1, 0) // stride + 1
    logits = count = None
    for i in range(gh):
        for j in range(gw):
            y1, x1 = min(i * stride, max(h - crop, 0)), min(j * stride, max(w - crop, 0))
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            out = model(x[:, :, y1:y2, x1:x2])
            if logits is None:
                logits = x.new_zeros(b, out.shape[1], h, w)
                count = x.new_zeros(1, 1, h, w)
            logits[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def segment_inference(
    model: nn.Module,
    x: Tensor,
    mode: str = "whole",
    crop: int = 512,
    stride: int = 341,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: Sequence[int] | None = None,
    scale: Sequence[int] | None = None,
) -> Tensor:
    """Class probabilities (B, K, H, W) for normalised images ``x`` at ``out_size`` (default: input size).

    ``mode``: "whole" (one pass) or "slide" (crop/stride windows). ``scales``/``flip``: the multi-scale + flip
    test; softmax outputs are averaged over all passes. ``scale`` (long, short): as mmseg's test pipeline
    (``img_scale=(2048, 512)`` for ADE20K), each pass first rescales the images keeping their aspect ratio to
    fit ``scale`` times the pass's ratio (:func:`rescale_size`; mmseg's multi-scale ratios are 0.5..1.75);
    without it the ratios apply to the input size.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    out_size = tuple(out_size or x.shape[2:])
    h, w = x.shape[2:]
    model.eval()
    total = None
    for s in scales:
        if scale is not None:
            size = rescale_size(h, w, scale, s)
        else:
            size = (max(1, round(h * s)), max(1, round(w * s)))
        xs = x if size == (h, w) else _up(x, size)
        for f in (False, True) if flip else (False,):
            xi = xs.flip(-1) if f else xs
            logits = model(xi) if mode == "whole" else _slide(model, xi, crop, stride)
            logits = logits.flip(-1) if f else logits
            p = _up(logits, out_size).softmax(1)
            total = p if total is None else total + p
    return total / (len(scales) * (2 if flip else 1))
