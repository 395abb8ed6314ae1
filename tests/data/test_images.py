"""decode_image on every odd file kind: good ones decode to the right mode, size and colours, bad ones
come back as BadSample with a reason, never an exception."""

import os

import numpy as np
import pytest
from oddfiles import BAD, GOOD, MAX_PIXELS
from PIL import Image

from davit.data import BadSample, decode_image, make_image_folder


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_files_decode(odd_folder, name, mode):
    img = decode_image(os.path.join(odd_folder, "train", "odd", name), mode, MAX_PIXELS)
    assert isinstance(img, Image.Image), img
    assert img.mode == mode and img.size == GOOD[name]


@pytest.mark.parametrize("name", BAD)
def test_bad_files_are_reported(odd_folder, name):
    bad = decode_image(os.path.join(odd_folder, "train", "odd", name), "RGB", MAX_PIXELS, name=name)
    assert isinstance(bad, BadSample) and bad.path == name and bad.reason


def test_bad_reasons_say_what_was_wrong(odd_folder):
    d = os.path.join(odd_folder, "train", "odd")
    assert "0 bytes" in decode_image(os.path.join(d, "zero_bytes.jpg")).reason
    assert "truncated" in decode_image(os.path.join(d, "truncated.jpg")).reason
    assert "too large" in decode_image(os.path.join(d, "bomb.png"), max_pixels=MAX_PIXELS).reason
    # the same file is fine under the default limit
    assert isinstance(decode_image(os.path.join(d, "bomb.png")), Image.Image)


def px(name, mode="RGB", xy=(0, 0), folder=None):
    return decode_image(os.path.join(folder, "train", "odd", name), mode).getpixel(xy)


def test_conversions_keep_the_picture(odd_folder):
    f = odd_folder
    # EXIF orientation 6 applied: the stored left (red) half is now on top
    top, bottom = px("exif_rotated.jpg", xy=(10, 5), folder=f), px("exif_rotated.jpg", xy=(10, 35), folder=f)
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50
    # 16-bit grey is scaled (65535 -> 255, 32768 -> 128), not clipped
    a = np.asarray(decode_image(os.path.join(f, "train", "odd", "grey16.png"), "L"))
    assert a.tolist() == [[0, 128, 255]]
    # transparency composited over white; palette colours kept
    assert px("palette_transparent.png", xy=(0, 0), folder=f) == (255, 255, 255)
    assert px("palette_transparent.png", xy=(7, 0), folder=f) == (200, 10, 10)
    assert px("rgba.png", folder=f) == (255, 255, 255)
    assert px("la.png", "L", folder=f) == 50
    # CMYK red -> RGB red; first GIF frame (red), not the second (blue); 1-bit white -> 255
    r, g, b = px("cmyk.jpg", folder=f)
    assert r > 240 and g < 20 and b < 20
    assert px("animated.gif", folder=f) == (255, 0, 0)
    assert px("bilevel.png", "L", folder=f) == 255


def test_bytes_input_and_bad_mode(odd_folder):
    with open(os.path.join(odd_folder, "train", "odd", "plain.png"), "rb") as fh:
        assert decode_image(fh.read()).size == (40, 32)
    assert isinstance(decode_image(b"garbage"), BadSample)
    with pytest.raises(ValueError, match="mode"):
        decode_image(b"", mode="CMYK")


def test_make_image_folder(tmp_path):
    root = make_image_folder(str(tmp_path), classes=("a", "b"), per_class=2, size=(7, 5))
    files = sorted(os.listdir(os.path.join(root, "val", "b")))
    assert files == ["b_0000.png", "b_0001.png"]
    assert Image.open(os.path.join(root, "val", "b", files[0])).size == (7, 5)
