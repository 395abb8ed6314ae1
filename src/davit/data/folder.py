"""``root/{train,val}/CLASS/*`` image folders, decoded robustly (see images.py): an unreadable file gives a
BadSample instead of an item, which the loader's collate drops and reports."""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from .images import DEFAULT_MAX_PIXELS, IMG_EXTENSIONS, BadSample, decode_image

__all__ = ["ImageFolder", "check_class_match", "SPLIT_ALIASES"]

# a "val" split may be laid out under any of these names
SPLIT_ALIASES = {"val": ("val", "validation", "test"), "train": ("train",), "test": ("test", "val")}


def _split_dir(root: str, split: str) -> str:
    for name in SPLIT_ALIASES.get(split, (split,)):
        d = os.path.join(root, name)
        if os.path.isdir(d):
            return d
    tried = ", ".join(os.path.join(root, n) for n in SPLIT_ALIASES.get(split, (split,)))
    raise FileNotFoundError(
        f"no '{split}' split folder: looked for {tried}; expected the layout "
        f"ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg"
    )


class ImageFolder(Dataset):
    """Items are ``(transform(image), class index)`` or a :class:`BadSample` for an unreadable file.

    Class folders are sorted by name. Files are those with an image extension (IMG_EXTENSIONS, any case);
    hidden files are ignored. ``mode`` "RGB" or "L"; ``max_pixels`` refuses decompression bombs.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        transform=None,
        mode: str = "RGB",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.root = _split_dir(root, split)
        self.split, self.transform, self.mode, self.max_pixels = split, transform, mode, max_pixels
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"{self.root} has no class folders; expected {self.root}/CLASS/*.jpg")
        self.classes = classes
        self.samples: list[tuple[str, int]] = []
        empty = []
        for k, cls in enumerate(classes):
            d = os.path.join(self.root, cls)
            files = []
            for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
                dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
                files += [
                    os.path.join(dirpath, f)
                    for f in sorted(filenames)
                    if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)
                ]
            if not files:
                empty.append(cls)
            self.samples += [(f, k) for f in files]
        if empty:
            raise ValueError(
                f"{len(empty)} class folder(s) in {self.root} hold no image files: "
                f"{', '.join(empty[:10])}; remove them or add images "
                f"(extensions {' '.join(IMG_EXTENSIONS)})"
            )
        self.targets = [k for _, k in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        img = decode_image(path, self.mode, self.max_pixels, name=os.path.relpath(path, self.root))
        if isinstance(img, BadSample):
            return img
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def check_class_match(train_ds, val_ds) -> None:
    """Raise ValueError unless both datasets have the same classes in the same order (so label k means the
    same class in both); call before training starts."""
    a, b = list(train_ds.classes), list(val_ds.classes)
    if a == b:
        return
    only_train = sorted(set(a) - set(b))
    only_val = sorted(set(b) - set(a))
    detail = []
    if only_train:
        detail.append(f"only in train: {', '.join(only_train[:10])}")
    if only_val:
        detail.append(f"only in val: {', '.join(only_val[:10])}")
    if not detail:
        detail.append("same names in a different order")
    raise ValueError(
        f"train has {len(a)} classes and val has {len(b)}, and they differ ({'; '.join(detail)}); "
        f"labels would mean different classes — make both splits hold the same class folders"
    )
