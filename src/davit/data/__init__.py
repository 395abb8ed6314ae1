"""Datasets (Fashion-MNIST IDX, image folders, tar shards), transforms, deterministic loaders and mixup.

Typical use (the trainer does this)::

    tf = build_transform(True, 224, aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    train = build_dataset("folder", "/data/imagenet", "train", transform=tf)
    val = build_dataset("folder", "/data/imagenet", "val", transform=build_transform(False, 224, crop_pct=.9))
    check_class_match(train, val)
    mixup, loss_fn = build_mixup(0.8, 1.0, 0.1, len(train.classes))
    loader = build_loader(train, 128, True, workers=8, distributed=True, seed=0, collate_mixup=mixup)
    for epoch in range(epochs):
        loader.set_epoch(epoch, start_iter=0)  # start_iter=k resumes after batch k-1 exactly
        for x, y in loader:
            ...
        if loader.bad:  # unreadable files met this epoch on this rank, from all workers
            print(loader.bad_report())

Small in-memory images train faster with batched augmentation: ``build_dataset("fashion-mnist", None,
"train", raw=True)`` + ``build_loader(..., batch_transform=build_batch_transform(True, 28, mean, std))``.
"""

from .batch_transforms import BatchTransform, build_batch_transform
from .datasets import DATASET_NAMES, build_dataset
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNIST,
    read_idx,
)
from .folder import ImageFolder, check_class_match
from .images import DEFAULT_MAX_PIXELS, BadSample, decode_image, make_image_folder
from .loader import EpochSampler, Loader, build_loader
from .mixup import BatchMixup, build_mixup
from .shards import ShardDataset, list_shards, write_shards
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform

__all__ = [
    "DATASET_NAMES",
    "build_dataset",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FashionMNIST",
    "read_idx",
    "ImageFolder",
    "check_class_match",
    "DEFAULT_MAX_PIXELS",
    "BadSample",
    "decode_image",
    "make_image_folder",
    "EpochSampler",
    "Loader",
    "build_loader",
    "BatchMixup",
    "build_mixup",
    "ShardDataset",
    "list_shards",
    "write_shards",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_transform",
    "BatchTransform",
    "build_batch_transform",
]
