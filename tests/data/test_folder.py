"""ImageFolder + loader: bad files are skipped, counted and named (also from worker processes); class folders
are checked before training starts."""

import os

import pytest
import torch
from oddfiles import BAD, GOOD, MAX_PIXELS
from torchvision import transforms as T

from davit.data import ImageFolder, build_dataset, build_loader, check_class_match


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_skips_counts_and_names_bad_files(odd_folder, workers):
    tf = T.Compose([T.Resize((16, 16)), T.ToTensor()])
    ds = build_dataset("folder", odd_folder, "train", transform=tf, max_pixels=MAX_PIXELS)
    assert ds.classes == ["odd", "plain"]
    assert len(ds) == len(GOOD) + len(BAD) + 3  # notes.txt and .DS_Store are not image files
    loader = build_loader(ds, batch_size=4, is_training=False, workers=workers)
    loader.set_epoch(0)
    n, labels = 0, []
    for x, y in loader:
        assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
        n += len(x)
        labels += y.tolist()
    assert n == len(GOOD) + 3
    assert sorted(os.path.basename(b.path) for b in loader.bad) == sorted(BAD)
    assert labels.count(1) == 3
    report = loader.bad_report()
    assert report.startswith(f"{len(BAD)} unreadable files skipped:") and all(b in report for b in BAD)
    # counts are per epoch: a second pass starts from zero and finds the same files
    assert sum(len(x) for x, _ in loader) == n and len(loader.bad) == len(BAD)


def test_all_bad_batch_is_skipped_but_counted(tmp_path):
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"{i}.jpg").write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(d / "9.png")
    ds = ImageFolder(str(tmp_path), "train", transform=T.ToTensor())
    loader = build_loader(ds, batch_size=3, is_training=False, workers=0)
    batches = list(loader)
    assert len(batches) == 1 and len(batches[0][0]) == 1  # the batch of three empty files never reaches us
    assert len(loader.bad) == 3 and loader.position == 2


def test_grey_mode(odd_folder):
    ds = ImageFolder(odd_folder, "val", transform=T.ToTensor(), mode="L", max_pixels=MAX_PIXELS)
    x, y = ds[ds.targets.index(1)]
    assert x.shape == (1, 12, 10) and y == 1


def test_class_mismatch_and_empty_class_errors(tmp_path, odd_folder):
    for split, classes in (("train", ("a", "b", "c")), ("val", ("a", "b", "d"))):
        for c in classes:
            os.makedirs(tmp_path / split / c)
            (tmp_path / split / c / "x.png").write_bytes(b"")
    train, val = ImageFolder(str(tmp_path), "train"), ImageFolder(str(tmp_path), "val")
    with pytest.raises(ValueError, match="only in train: c; only in val: d"):
        check_class_match(train, val)
    check_class_match(train, ImageFolder(str(tmp_path), "train"))
    check_class_match(ImageFolder(odd_folder, "train"), ImageFolder(odd_folder, "val"))
    os.makedirs(tmp_path / "train" / "empty")
    (tmp_path / "train" / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="hold no image files: empty"):
        ImageFolder(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="ROOT/train/CLASS"):
        ImageFolder(str(tmp_path / "nowhere"), "train")


def test_val_split_aliases(tmp_path):
    os.makedirs(tmp_path / "validation" / "a")
    (tmp_path / "validation" / "a" / "x.png").write_bytes(b"")
    assert ImageFolder(str(tmp_path), "val").root.endswith("validation")


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="fashion-mnist, folder, wds"):
        build_dataset("imagenet-tar", "/tmp", "train")


def test_real_augmentation_is_reproducible_with_any_workers(tmp_path):
    """RandomResizedCrop + RandAugment + random erasing draw from python, numpy and torch RNGs: all seeded
    per batch, so 0 and 2 workers give identical batches, and the next epoch differs."""
    from davit.data import build_transform, make_image_folder

    root = make_image_folder(str(tmp_path), per_class=4, splits=("train",))
    tf = build_transform(True, 16, aa="rand-m9-mstd0.5-inc1", reprob=0.5)
    ds = build_dataset("folder", root, "train", transform=tf)
    runs = []
    for workers, epoch in ((0, 0), (2, 0), (0, 1)):
        loader = build_loader(ds, 4, is_training=True, workers=workers, seed=0)
        loader.set_epoch(epoch)
        runs.append(torch.cat([x for x, _ in loader]))
    assert runs[0].shape == (12, 3, 16, 16)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
