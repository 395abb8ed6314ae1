import json

import numpy as np
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
