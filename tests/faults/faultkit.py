"""Helpers for the fault suite: a tiny `davit train` command line (seconds on 2 cores), odd files."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

# davit_atto shrunk to one block per stage at 16 px: a whole run is a few seconds of CPU
TINY_ARGS = [
    "--model", "davit_atto",
    "--model-kwargs", json.dumps({"depths": [1, 1, 1, 1], "embed_dims": [16, 16, 16, 16],
                                  "num_heads": [1, 1, 1, 1], "window_size": 4}),
    "--img-size", "16", "--simple-aug", "-j", "0", "--epochs", "1", "--warmup-epochs", "0",
    "--cooldown-epochs", "0", "--seed", "1", "--device", "cpu", "--progress", "none", "--no-tensorboard",
]  # fmt: skip
FMNIST_ARGS = ["--dataset", "fashion-mnist", "--num-classes", "10", "--in-chans", "1",
               "--train-samples", "16", "--val-samples", "8", "-b", "8"]  # fmt: skip


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run `davit ARGV` in this process; return (exit code, stdout + stderr)."""
    from davit.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


@pytest.fixture
def tiny_train(tmp_path):
    """``tiny_train(*extra)``: argv of a tiny one-epoch Fashion-MNIST `davit train` into tmp_path/runs."""

    def make(*extra: str, fmnist: bool = True) -> list[str]:
        return [
            "train",
            *TINY_ARGS,
            *(FMNIST_ARGS if fmnist else []),
            "--output",
            str(tmp_path / "runs"),
            *extra,
        ]

    return make


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG claiming ``w`` x ``h`` grey pixels with a tiny IDAT: a decompression bomb's header, built
    without ever holding w*h bytes (the decoder must refuse it by its size before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _jpeg(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90)
    return b.getvalue()


# every odd kind of file: name -> (bytes writer, is it bad?)
def odd_files() -> dict[str, tuple[bytes, bool]]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8))
    full = _jpeg(noise)

    def save(img: Image.Image, fmt: str, **kw) -> bytes:
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        return b.getvalue()

    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    gif = [Image.new("RGB", (6, 5), c) for c in ((255, 0, 0), (0, 0, 255))]
    gb = io.BytesIO()
    gif[0].save(gb, "GIF", save_all=True, append_images=gif[1:], duration=50, loop=0)
    return {
        "zero_bytes.jpg": (b"", True),
        "truncated.jpg": (full[: len(full) // 2], True),
        "text.jpg": (b"this is not an image\n", True),
        "bomb.png": (png_header_only(20000, 20000), True),  # 4e8 pixels > the 89.5M default limit
        "one_pixel.png": (save(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), False),
        "grey16.png": (save(Image.fromarray(np.array([[0, 32768, 65535]] * 3, np.uint16)), "PNG"), False),
        "palette.png": (save(pal, "PNG", transparency=0), False),
        "cmyk.jpg": (_jpeg(Image.new("CMYK", (9, 7), (0, 255, 255, 0))), False),
        "animated.gif": (gb.getvalue(), False),
        "plain.jpg": (full, False),
    }


def write_folder(
    root, classes_train=("a", "b"), classes_val=("a", "b"), odd_in: str | None = "a", n: int = 4
):
    """root/{train,val}/CLASS with ``n`` good images each; all odd files added to train/``odd_in``."""
    rng = np.random.default_rng(1)
    for split, classes in (("train", classes_train), ("val", classes_val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(d / f"img{i}.png")
    if odd_in is not None:
        for name, (data, _) in odd_files().items():
            (root / "train" / odd_in / name).write_bytes(data)
    return root
