"""Fashion-MNIST from its IDX files (Debian's ``dataset-fashion-mnist``), decoded once into memory.

IDX format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code (0x08 = unsigned byte), the
number of dimensions, then each dimension as a big-endian int32, then the data, row-major.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "read_idx",
    "FashionMNIST",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# of the 60k training pixels scaled to [0, 1] (checked against the files in tests/data)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MISSING_HELP = (
    "install the Debian package with 'sudo apt-get install dataset-fashion-mnist' "
    f"(files go to {FASHION_MNIST_DIR}), or pass --data-dir DIR holding the IDX files"
)


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or plain) with ``ndim`` dimensions; raise ValueError
    naming the file and what was expected if it is truncated or not such a file."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(
            f"{path}: cannot read the compressed file ({e}); it is truncated or corrupt — "
            f"re-download it or reinstall dataset-fashion-mnist"
        ) from e
    want = f"an IDX file of unsigned bytes with {ndim} dimension(s) (magic 0x0000080{ndim})"
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: only {len(raw)} bytes, too short for the IDX header; expected {want}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise ValueError(f"{path}: bad magic number 0x{magic:08x}; expected {want}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(
            f"{path}: {len(raw)} bytes but the header says {'x'.join(map(str, dims))} "
            f"needing {expected}; the file is truncated or corrupt"
        )
    # a writable array (frombuffer over bytes is read-only, which torch.from_numpy warns about)
    return np.frombuffer(bytearray(raw), np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        p = os.path.join(root, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {root}: {_MISSING_HELP}")


class FashionMNIST(Dataset):
    """The 60k training or 10k official test images; items are ``(PIL image 28x28, label)``.

    ``split`` is "train", or "val"/"test" (both the official test set: Fashion-MNIST has no separate
    validation set). ``mode`` "L" (default) or "RGB" (grey replicated, for 3-channel models). ``raw=True``:
    items are uint8 tensors (C, 28, 28) instead of PIL images, for batched augmentation (batch_transforms.py);
    ``transform`` is then not used. ``.data`` is the uint8 array (N, 28, 28).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        transform=None,
        mode: str = "L",
        raw: bool = False,
    ):
        root = root or FASHION_MNIST_DIR
        if split not in ("train", "val", "test"):
            raise ValueError(f"Fashion-MNIST split must be 'train', 'val' or 'test', got {split!r}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Fashion-MNIST directory {root} does not exist: {_MISSING_HELP}")
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
        img_file, lbl_file = (_find(root, s) for s in _FILES["train" if split == "train" else "test"])
        self.data = read_idx(img_file, 3)
        labels = read_idx(lbl_file, 1)
        if len(labels) != len(self.data):
            raise ValueError(
                f"{img_file} has {len(self.data)} images but {lbl_file} has {len(labels)} labels"
            )
        if self.data.shape[1:] != (28, 28):
            raise ValueError(f"{img_file}: images are {self.data.shape[1:]}, expected 28x28 Fashion-MNIST")
        if labels.size and labels.max() >= len(self.classes):
            raise ValueError(f"{lbl_file}: label {labels.max()} out of range 0..{len(self.classes) - 1}")
        self.targets = labels.astype(np.int64).tolist()
        self._tensor = torch.from_numpy(self.data)
        self.root, self.split, self.transform, self.mode, self.raw = root, split, transform, mode, raw

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch at once (the DataLoader's batched fetch): one gather instead of N item calls."""
        if not self.raw:
            return [self[i] for i in indices]
        x = self._tensor[torch.as_tensor(indices, dtype=torch.long)][:, None]  # B, 1, 28, 28
        if self.mode == "RGB":
            x = x.expand(-1, 3, -1, -1)
        return list(zip(x.unbind(0), [self.targets[i] for i in indices]))

    def __getitem__(self, i: int):
        if self.raw:
            x = self._tensor[i][None]
            return (x.expand(3, -1, -1) if self.mode == "RGB" else x).clone(), self.targets[i]
        img = Image.fromarray(self.data[i], "L")
        if self.mode == "RGB":
            img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]
