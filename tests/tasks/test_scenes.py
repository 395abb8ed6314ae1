import json
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from davit.tasks.scenes import FASHION_CLASSES, build_scenes, read_fashion_mnist


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fashion_mnist_reader():
    images, labels = read_fashion_mnist(split="test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))


def test_scenes_are_deterministic(tmp_path, scenes):
    build_scenes(
        tmp_path / "a", num_train=6, num_val=4, size=64, items=(1, 3), item_frac=(0.25, 0.45), seed=3
    )
    assert _files(tmp_path / "a") == _files(scenes)
    build_scenes(
        tmp_path / "b", num_train=6, num_val=4, size=64, items=(1, 3), item_frac=(0.25, 0.45), seed=4
    )
    assert _files(tmp_path / "b") != _files(scenes)


def test_scene_annotations_are_valid_coco(scenes):
    for split, n in (("train", 6), ("val", 4)):
        coco = COCO(str(scenes / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(FASHION_CLASSES)
        assert len(coco.getAnnIds()) >= n  # at least one item per canvas
        for img in coco.loadImgs(coco.getImgIds()):
            label = np.array(Image.open(scenes / "labels" / split / img["file_name"]))
            rgb = Image.open(scenes / "images" / split / img["file_name"])
            assert rgb.mode == "RGB" and rgb.size == (64, 64) and label.shape == (64, 64)
            expect = np.zeros_like(label)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                m = coco.annToMask(ann).astype(bool)
                assert m.sum() == ann["area"] > 0
                x, y, w, h = ann["bbox"]
                ys, xs = np.nonzero(m)
                assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                assert mask_utils.area(ann["segmentation"]) == ann["area"]
                assert not expect[m].any()  # items do not overlap
                expect[m] = ann["category_id"]  # semantic label = category id (0 background)
            np.testing.assert_array_equal(label, expect)
    meta = json.loads((scenes / "meta.json").read_text())
    assert meta["semantic_classes"][0] == "background" and len(meta["semantic_classes"]) == 11


def test_building_over_other_scenes_is_refused_and_keeps_them(tmp_path):
    kw = dict(num_train=2, num_val=4, size=32, items=(1, 1), item_frac=(0.3, 0.4), seed=0)
    build_scenes(tmp_path, **kw)
    before = _files(tmp_path)
    build_scenes(tmp_path, **kw)  # the same arguments again: allowed (and byte-identical)
    assert _files(tmp_path) == before
    with pytest.raises(ValueError, match=r"other arguments \(different: num_val\).*choose an empty folder"):
        build_scenes(tmp_path, **{**kw, "num_val": 2})  # would leave 2 stale val scenes beside the JSON's 2
    with pytest.raises(ValueError, match=r"different: seed"):
        build_scenes(tmp_path, **{**kw, "seed": 1})  # same files, other content: meta.json would lie
    assert _files(tmp_path) == before  # nothing of the old dataset was touched
    # without meta.json (an interrupted build) the leftover PNGs alone are enough to refuse
    (tmp_path / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"images/val holds 2 PNG files .* \(e.g. 000002.png\)"):
        build_scenes(tmp_path, **{**kw, "num_val": 2})
    assert len(list((tmp_path / "images" / "val").glob("*.png"))) == 4


def test_scenes_cli_refuses_a_folder_with_other_scenes(tmp_path, capsys):
    from davit.cli import main

    args = ["data", "scenes", "--out", str(tmp_path), "--num-train", "1", "--size", "32"]
    assert main([*args, "--num-val", "2"]) == 0
    assert main([*args, "--num-val", "1"]) == 2  # a clear error, no traceback
    assert "choose an empty folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"size": 16}, "canvas size must be >= 32 pixels, got 16"),
        ({"items": (3, 1)}, "items must be (min, max) with 1 <= min <= max"),
        ({"item_frac": (0.5, 2.0)}, "item_frac must be (min, max) canvas fractions"),
        ({"num_train": -3}, "scene counts must be >= 0, got num_train=-3"),  # printed "wrote -3 train" before
    ],
)
def test_impossible_scene_arguments_are_refused_before_writing(tmp_path, kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_scenes(tmp_path / "out", **{"num_train": 1, "num_val": 1, "size": 32, **kw})
    assert not (tmp_path / "out").exists()
