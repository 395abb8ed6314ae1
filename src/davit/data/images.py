"""Decoding one image file robustly, and the marker for a file that could not be decoded.

Real image collections contain every PIL mode, EXIF-rotated photos, animated GIFs, 16-bit scans, zero-byte and
truncated files and the odd text file named ``.jpg``. Decoding never raises: a file that cannot be turned
into an image comes back as a :class:`BadSample` (path and reason) so the loader can skip it, count it and
name it.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps

__all__ = ["BadSample", "IMG_EXTENSIONS", "DEFAULT_MAX_PIXELS", "decode_image", "make_image_folder"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# PIL's own bomb threshold (Image.MAX_IMAGE_PIXELS): about a 9459 x 9459 image, ~270 MB as RGB
DEFAULT_MAX_PIXELS = 89_478_485
# transparent pixels are shown over white, as a browser shows them on a page
BACKGROUND = (255, 255, 255)


class BadSample(NamedTuple):
    """Returned instead of ``(image, target)`` for a file that could not be decoded."""

    path: str
    reason: str


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grey images -> 8-bit "L", scaled (PIL's convert would clip at 255)."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a * 255.0 if np.nanmax(a) <= 1.0 else a  # floats in [0, 1] are the common convention
        a = np.nan_to_num(a)
    elif img.mode.startswith("I;16") or a.max() > 255:
        a = a.astype(np.float64) / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _convert(img: Image.Image, mode: str) -> Image.Image:
    """Any PIL mode -> "RGB" or "L", compositing transparency over BACKGROUND."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if img.mode == "P":
        # palette images may carry transparency in the palette: expand it to a real alpha channel first
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode == "1":
        img = img.convert("L")
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return img if img.mode == mode else img.convert(mode)


def decode_image(
    src: str | bytes, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image | BadSample:
    """Open ``src`` (a path or the file's bytes) as a ``mode`` ("RGB" or "L") image with EXIF orientation
    applied and the first frame of an animation; return a BadSample instead of raising for anything
    unreadable."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    label = name or (src if isinstance(src, str) else "<bytes>")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # someone made PIL grey-fill truncated files silently; we would train on garbage without knowing
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images will not be detected", stacklevel=2
        )
    try:
        if isinstance(src, str) and os.path.getsize(src) == 0:
            return BadSample(label, "empty file (0 bytes)")
        with warnings.catch_warnings():
            # we enforce our own pixel limit below, before any pixel is decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src if isinstance(src, str) else io.BytesIO(src)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    return BadSample(label, f"too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
                if w < 1 or h < 1:
                    return BadSample(label, f"empty image {w}x{h}")
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                img.load()  # decode now: a truncated file fails here, inside the try
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # a broken EXIF block must not cost us an otherwise good image
                    pass
                return _convert(img, mode)
    except Image.DecompressionBombError as e:
        return BadSample(label, f"too large: {e}")
    except Exception as e:  # any decoder failure makes the file bad, never the run
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return BadSample(label, f"{type(e).__name__}: {reason}"[:200])


def make_image_folder(
    root: str,
    classes: tuple[str, ...] = ("cat", "dog", "fish"),
    per_class: int = 4,
    splits: tuple[str, ...] = ("train", "val"),
    size: tuple[int, int] = (40, 32),
    seed: int = 0,
) -> str:
    """Write a tiny synthetic ``root/{split}/{class}/*.png`` folder (class k has mean brightness ~ k), for
    tests and smoke runs. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for k, cls in enumerate(classes):
            d = os.path.join(root, split, cls)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                base = 40 + 170 * k / max(1, len(classes) - 1)
                a = np.clip(rng.normal(base, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a, "RGB").save(os.path.join(d, f"{cls}_{i:04d}.png"))
    return root
