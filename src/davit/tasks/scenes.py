"""Synthetic-layout, real-content scenes for the dense tasks: Fashion-MNIST items on varied backgrounds.

There is no COCO or ADE20K on this machine, so `davit data scenes --out DIR` composes real Fashion-MNIST
images
(train split for training scenes, the official test split for validation scenes) onto canvases and writes both
annotation styles the tasks read:

    DIR/images/{train,val}/000000.png          RGB canvases
    DIR/labels/{train,val}/000000.png          semantic label maps ("L"): 0 background, 1..10 the classes
    DIR/annotations/instances_{train,val}.json COCO instances (boxes, RLE masks from the item silhouettes)
    DIR/meta.json                              class names, sizes, generator arguments

Every scene is drawn from its own generator seeded by (seed, split, index), so the output is byte-identical
for the same arguments and a scene does not depend on how many others are generated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, build_dataset

FASHION_MNIST_ROOT = FASHION_MNIST_DIR
FASHION_CLASSES = FASHION_MNIST_CLASSES
_SPLIT_ID = {"train": 0, "val": 1}


def read_fashion_mnist(
    root: str | os.PathLike = FASHION_MNIST_ROOT, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) from the IDX gz files (train: 60k, test: 10k), read and
    checked by the data package."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    ds = build_dataset("fashion-mnist", str(root), "val" if split == "test" else "train", raw=True)
    return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """One of four background kinds, float32 (size, size, 3) in [0, 255]."""
    kind = rng.integers(4)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == 0:  # linear gradient in a random direction
        t = np.linspace(0, 1, size, dtype=np.float32)
        a = rng.uniform(0, 2 * np.pi)
        ramp = np.clip(0.5 + (np.cos(a) * (t[None, :] - 0.5) + np.sin(a) * (t[:, None] - 0.5)), 0, 1)
        bg = c0 + (c1 - c0) * ramp[..., None]
    elif kind == 1:  # smooth colour noise: a coarse random grid upsampled
        cells = int(rng.integers(2, 8))
        grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        bg = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float32)
    elif kind == 2:  # stripes
        period = int(rng.integers(6, 32))
        phase = (
            (np.arange(size)[None, :] + (np.arange(size)[:, None] if rng.integers(2) else 0)) // period % 2
        )
        bg = np.where(phase[..., None] == 1, c0, c1) * np.ones((size, size, 1))
    else:  # flat colour
        bg = np.broadcast_to(c0, (size, size, 3))
    noise = rng.normal(0, rng.uniform(0, 12), (size, size, 3))
    return np.clip(bg + noise, 0, 255).astype(np.float32)


def make_scene(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    size: int = 256,
    items: tuple[int, int] = (2, 5),
    item_frac: tuple[float, float] = (0.15, 0.45),
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One canvas: (uint8 RGB (size, size, 3), [(class index 0..9, bool mask (size, size)), ...]).

    Items never overlap (their silhouettes keep a 2-pixel gap), so each mask is the item's full silhouette.
    """
    canvas = _background(rng, size)
    taken = np.zeros((size, size), bool)
    instances: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(items[0], items[1] + 1))):
        idx = int(rng.integers(len(images)))
        side = max(8, int(round(size * rng.uniform(*item_frac))))
        item = np.asarray(Image.fromarray(images[idx]).resize((side, side), Image.BILINEAR), np.float32) / 255
        sil = item > 0.1  # the item silhouette: Fashion-MNIST items sit on a black background
        if sil.sum() < 16:
            continue
        ys, xs = np.nonzero(sil)
        item, sil = (
            item[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1],
            sil[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1],
        )
        h, w = sil.shape
        for _attempt in range(30):
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            y0, x0 = max(0, y - 2), max(0, x - 2)
            if not taken[y0 : y + h + 2, x0 : x + w + 2].any():
                break
        else:
            continue
        region = canvas[y : y + h, x : x + w]
        # pick an item colour that contrasts with the background under it (luminance differs by >= 70)
        bg_lum = region.mean()
        for _attempt in range(20):
            colour = rng.uniform(0, 255, 3)
            if abs(colour.mean() - bg_lum) >= 70:
                break
        shade = colour * (0.35 + 0.65 * item[..., None])  # keep the item's own texture
        alpha = np.clip(item * 4, 0, 1)[..., None] * sil[..., None]
        canvas[y : y + h, x : x + w] = region * (1 - alpha) + shade * alpha
        mask = np.zeros((size, size), bool)
        mask[y : y + h, x : x + w] = sil
        taken |= mask
        instances.append((int(labels[idx]), mask))
    return np.clip(canvas, 0, 255).round().astype(np.uint8), instances


def _check_target(out: Path, meta: dict, counts: dict[str, int]) -> None:
    """Refuse to build over a different scene dataset: its extra PNGs would stay beside the new ones (the
    segmentation reader takes every image/label pair on disk, whatever the JSON lists) and its meta.json
    would describe other scenes. Rebuilding the same arguments rewrites the same files and is allowed."""
    advice = f"choose an empty folder, or delete {out} yourself if you no longer need it"
    meta_file = out / "meta.json"
    if meta_file.is_file():
        try:
            old = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{meta_file} exists but cannot be read ({e}); {advice}") from e
        new = json.loads(json.dumps(meta))  # tuples -> lists, as they were written
        if old != new:
            diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise ValueError(
                f"{out} already holds scenes built with other arguments (different: {', '.join(diff)}); "
                + advice
            )
    for split, count in counts.items():
        mine = {f"{i:06d}.png" for i in range(count)}
        for kind in ("images", "labels"):
            d = out / kind / split
            extra = sorted(p.name for p in d.glob("*") if p.suffix.lower() == ".png" and p.name not in mine)
            if extra:
                raise ValueError(
                    f"{d} holds {len(extra)} PNG files this build of {count} {split} scenes would not "
                    f"write (e.g. {extra[0]}), left from another build; {advice}"
                )


def build_scenes(
    out: str | os.PathLike,
    num_train: int = 2000,
    num_val: int = 300,
    size: int = 256,
    items: tuple[int, int] = (2, 5),
    item_frac: tuple[float, float] = (0.15, 0.45),
    seed: int = 0,
    fmnist_root: str | os.PathLike = FASHION_MNIST_ROOT,
) -> dict:
    """Write the scene dataset to ``out`` (layout in the module docstring); returns the meta dict.

    ``out`` must be empty, new, or hold scenes built with these same arguments (rebuilt byte-identically);
    a folder with other scenes or stray PNGs in the image/label folders is refused with a ValueError before
    anything is written.
    """
    if size < 32:
        raise ValueError(f"canvas size must be >= 32 pixels, got {size}")
    if not (1 <= items[0] <= items[1]):
        raise ValueError(f"items must be (min, max) with 1 <= min <= max, got {items}")
    if not (0 < item_frac[0] <= item_frac[1] <= 0.9):
        raise ValueError(f"item_frac must be (min, max) canvas fractions in (0, 0.9], got {item_frac}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"scene counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    out = Path(out)
    meta = dict(
        classes=list(FASHION_CLASSES),
        semantic_classes=["background", *FASHION_CLASSES],
        size=size,
        num_train=num_train,
        num_val=num_val,
        items=list(items),
        item_frac=list(item_frac),
        seed=seed,
        source="Fashion-MNIST (train split -> train scenes, official test split -> val scenes)",
    )
    _check_target(out, meta, {"train": num_train, "val": num_val})
    for split, count in (("train", num_train), ("val", num_val)):
        images, labels = read_fashion_mnist(fmnist_root, "train" if split == "train" else "test")
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        coco: dict = dict(
            images=[],
            annotations=[],
            categories=[
                dict(id=i + 1, name=n, supercategory="fashion") for i, n in enumerate(FASHION_CLASSES)
            ],
        )
        for i in range(count):
            rng = np.random.default_rng([seed, _SPLIT_ID[split], i])
            img, inst = make_scene(rng, images, labels, size, items, item_frac)
            name = f"{i:06d}.png"
            Image.fromarray(img).save(out / "images" / split / name)
            sem = np.zeros((size, size), np.uint8)
            coco["images"].append(dict(id=i + 1, file_name=name, width=size, height=size))
            for cls, m in inst:
                sem[m] = cls + 1
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                ys, xs = np.nonzero(m)
                x0, y0 = int(xs.min()), int(ys.min())
                coco["annotations"].append(
                    dict(
                        id=len(coco["annotations"]) + 1,
                        image_id=i + 1,
                        category_id=cls + 1,
                        iscrowd=0,
                        bbox=[x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                        area=int(m.sum()),
                        segmentation=dict(size=list(rle["size"]), counts=rle["counts"].decode("ascii")),
                    )
                )
            Image.fromarray(sem, mode="L").save(out / "labels" / split / name)
        with open(out / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco, f)
    with open(out / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    return meta
