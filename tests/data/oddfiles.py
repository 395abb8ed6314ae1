"""One file of every odd kind a real image collection has, good and bad (used by conftest and tests)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

# name -> expected decoded RGB size (w, h) for the good files
GOOD = {
    "plain.png": (40, 32),
    "one_pixel.png": (1, 1),
    "grey16.png": (3, 1),
    "palette_transparent.png": (8, 8),
    "cmyk.jpg": (4, 4),
    "animated.gif": (6, 5),
    "exif_rotated.jpg": (20, 40),  # stored 40x20 with orientation 6 (rotate 90 degrees clockwise)
    "rgba.png": (5, 5),
    "la.png": (5, 5),
    "bilevel.png": (9, 9),
}
BAD = ("zero_bytes.jpg", "truncated.jpg", "text.jpg", "bomb.png")
MAX_PIXELS = 10_000  # the test's decompression-bomb limit: bomb.png has 120 x 120 = 14400 pixels


def _jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=95, **kw)
    return b.getvalue()


def write_odd_files(d: str) -> None:
    os.makedirs(d, exist_ok=True)
    p = lambda name: os.path.join(d, name)  # noqa: E731
    Image.fromarray(np.full((32, 40, 3), 100, np.uint8)).save(p("plain.png"))
    Image.new("RGB", (1, 1), (1, 2, 3)).save(p("one_pixel.png"))
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(p("grey16.png"))
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.paste(1, (4, 0, 8, 8))  # right half is palette colour 1 (red), left half colour 0 (transparent)
    pal.save(p("palette_transparent.png"), transparency=0)
    with open(p("cmyk.jpg"), "wb") as f:
        f.write(_jpeg(Image.new("CMYK", (4, 4), (0, 255, 255, 0))))  # pure red in CMYK
    frames = [Image.new("RGB", (6, 5), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(p("animated.gif"), save_all=True, append_images=frames[1:], duration=50, loop=0)
    rot = Image.new("RGB", (40, 20), (255, 0, 0))
    rot.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6
    with open(p("exif_rotated.jpg"), "wb") as f:
        f.write(_jpeg(rot, exif=exif))
    Image.new("RGBA", (5, 5), (0, 0, 0, 0)).save(p("rgba.png"))  # fully transparent black -> white
    Image.new("LA", (5, 5), (50, 255)).save(p("la.png"))
    Image.new("1", (9, 9), 1).save(p("bilevel.png"))
    open(p("zero_bytes.jpg"), "wb").close()
    data = _jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    with open(p("truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(p("text.jpg"), "w") as f:
        f.write("this is not an image\n")
    Image.new("L", (120, 120), 7).save(p("bomb.png"))
    with open(p("notes.txt"), "w") as f:  # not an image extension: ignored, not counted
        f.write("x")
    open(p(".DS_Store"), "wb").close()
