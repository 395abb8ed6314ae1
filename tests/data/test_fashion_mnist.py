"""Fashion-MNIST IDX parsing: the real files, and clear errors for truncated or wrong files."""

import copy
import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from davit.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNIST,
    build_dataset,
    read_idx,
)

needs_data = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist (make data)"
)


@pytest.fixture(scope="module")
def train():
    return FashionMNIST(None, "train")


@needs_data
def test_real_files(train):
    test = build_dataset("fashion-mnist", None, "val")
    assert train.data.shape == (60000, 28, 28) and train.data.dtype == np.uint8
    assert test.data.shape == (10000, 28, 28) and len(test.targets) == 10000
    assert np.bincount(train.targets).tolist() == [6000] * 10  # the official split is balanced
    assert np.bincount(test.targets).tolist() == [1000] * 10
    assert train.classes == FASHION_MNIST_CLASSES and len(FASHION_MNIST_CLASSES) == 10
    counts = np.bincount(train.data.ravel(), minlength=256)  # exact mean/std of 47M pixels, cheaply
    v = np.arange(256) / 255
    mean = (counts * v).sum() / counts.sum()
    std = np.sqrt((counts * (v - mean) ** 2).sum() / counts.sum())
    assert abs(mean - FASHION_MNIST_MEAN[0]) < 1e-3 and abs(std - FASHION_MNIST_STD[0]) < 1e-3


@needs_data
def test_items(train):
    img, y = train[0]
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img), train.data[0]) and y == train.targets[0]
    rgb = FashionMNIST(None, "test", mode="RGB")[3][0]
    assert rgb.mode == "RGB" and rgb.size == (28, 28)
    raw = copy.copy(train)
    raw.raw = True
    x, y = raw[5]
    assert (
        x.dtype == torch.uint8
        and x.shape == (1, 28, 28)
        and torch.equal(x[0], torch.from_numpy(train.data[5]))
    )
    batch = raw.__getitems__([5, 0, 7])
    assert all(torch.equal(a[0], raw[i][0]) and a[1] == raw[i][1] for a, i in zip(batch, [5, 0, 7]))


def write_idx(path, dims, payload_len=None, magic=None):
    header = (magic if magic is not None else 0x800 + len(dims)).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in dims)
    n = int(np.prod(dims)) if payload_len is None else payload_len
    data = header + bytes(n)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def test_parse_and_errors(tmp_path):
    ok = str(tmp_path / "ok-idx3-ubyte")
    write_idx(ok, (2, 28, 28))
    assert read_idx(ok, 3).shape == (2, 28, 28)
    gz = str(tmp_path / "ok.gz")
    write_idx(gz, (5,))
    assert read_idx(gz, 1).tolist() == [0] * 5
    short = str(tmp_path / "short-idx3-ubyte")
    write_idx(short, (3, 28, 28), payload_len=100)
    with pytest.raises(ValueError, match=r"short-idx3-ubyte: .* truncated"):
        read_idx(short, 3)
    labels_as_images = str(tmp_path / "labels")
    write_idx(labels_as_images, (10,))
    with pytest.raises(ValueError, match=r"labels: bad magic number 0x00000801; expected .*3 dimension"):
        read_idx(labels_as_images, 3)
    text = tmp_path / "text"
    text.write_text("hello, this is a text file and not an IDX file")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(str(text), 1)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(str(tiny), 1)
    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(gzip.compress(bytes(5000))[:30])
    with pytest.raises(ValueError, match="cut.gz: cannot read the compressed file"):
        read_idx(str(cut_gz), 1)


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(str(tmp_path / "missing"), "train")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        FashionMNIST(str(tmp_path), "train")
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"), (4, 28, 28))
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), (3,))
    with pytest.raises(ValueError, match="4 images but .* 3 labels"):
        FashionMNIST(str(tmp_path), "test")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(str(tmp_path), "holdout")
