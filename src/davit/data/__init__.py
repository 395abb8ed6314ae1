"""Datasets (Fashion-MNIST IDX, image folders, tar shards), transforms, deterministic loaders and mixup."""

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
