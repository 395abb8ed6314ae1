"""Fixtures for the data tests."""

from __future__ import annotations

import os

import pytest
from oddfiles import write_odd_files
from PIL import Image


@pytest.fixture(scope="session")
def odd_folder(tmp_path_factory) -> str:
    """root/train/{odd,plain}/..., root/val/{odd,plain}/...: 'odd' holds GOOD + BAD files."""
    root = str(tmp_path_factory.mktemp("odd"))
    for split in ("train", "val"):
        write_odd_files(os.path.join(root, split, "odd"))
        os.makedirs(os.path.join(root, split, "plain"))
        for i in range(3):
            Image.new("RGB", (10, 12), (i, i, i)).save(os.path.join(root, split, "plain", f"{i}.png"))
    return root
