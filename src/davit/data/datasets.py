"""One entry point for every dataset kind the trainer accepts."""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from .fashion_mnist import FashionMNIST
from .folder import SPLIT_ALIASES, ImageFolder
from .images import DEFAULT_MAX_PIXELS
from .shards import ShardDataset

__all__ = ["DATASET_NAMES", "build_dataset"]

DATASET_NAMES = ("fashion-mnist", "folder", "wds")


def build_dataset(
    name: str,
    root: str | None,
    split: str,
    transform=None,
    download: bool = False,
    mode: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    raw: bool = False,
) -> Dataset:
    """``name``: "fashion-mnist" (IDX files in ``root`` or /usr/share/datasets/fashion-mnist; split "train" or
    "val"/"test" = the official 10k), "folder" (``root/{train,val}/CLASS/*``) or "wds" (tar shards: ``root``
    is a folder of *.tar holding ``train``/``val`` subfolders or the shards themselves, or a brace pattern).

    ``mode``: "RGB" or "L" images for the transform (default: "L" for fashion-mnist, "RGB" otherwise).
    ``download`` is accepted for timm-style callers but nothing is downloaded: there is no network on the
    machines this runs on; Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``.
    ``raw=True`` (fashion-mnist only): uint8 tensor items for ``build_loader(batch_transform=...)``.
    Every dataset has ``.classes``; map-style ones also ``.targets``.
    """
    name = name.lower().replace("_", "-")
    if name in ("fashion-mnist", "fashionmnist", "fmnist"):
        return FashionMNIST(root, split, transform=transform, mode=mode or "L", raw=raw)
    if raw:
        raise ValueError("raw=True (uint8 tensors for batched augmentation) is only for fashion-mnist")
    if root is None:
        raise ValueError(f"dataset '{name}' needs a data directory (--data-dir)")
    if name in ("folder", "imagefolder", "image-folder"):
        return ImageFolder(root, split, transform=transform, mode=mode or "RGB", max_pixels=max_pixels)
    if name in ("wds", "webdataset", "shards"):
        if os.path.isdir(root):
            for sub in SPLIT_ALIASES.get(split, (split,)):
                if os.path.isdir(os.path.join(root, sub)):
                    root = os.path.join(root, sub)
                    break
        return ShardDataset(root, transform=transform, mode=mode or "RGB", max_pixels=max_pixels)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
