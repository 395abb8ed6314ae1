"""Bad data through `davit train` end to end: skipped, counted, named; mismatches refused up front."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
from faultkit import odd_files, run_cli, write_folder


@pytest.mark.slow
def test_odd_files_train_end_to_end(tmp_path, tiny_train, capsys):
    root = write_folder(tmp_path / "data")
    rc, out = run_cli(
        tiny_train("--dataset", "folder", "--data-dir", str(root), "-b", "4", fmnist=False), capsys
    )
    assert rc == 0, out
    bad = sorted(n for n, (_, is_bad) in odd_files().items() if is_bad)
    # the epoch line counts and names every bad file, with a reason; good odd files (1x1, 16-bit, palette,
    # CMYK, animated GIF) are not among them
    line = next(ln for ln in out.splitlines() if "unreadable" in ln)
    assert f"{len(bad)} unreadable files skipped" in line, line
    for name in bad:
        assert name in line
    for name, (_, is_bad) in odd_files().items():
        if not is_bad:
            assert name not in line
    assert "too large" in line and "empty file" in line
    run = next((tmp_path / "runs").iterdir())
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_files"] for r in recs if r["kind"] == "epoch"] == [len(bad)]
    assert (run / "model.safetensors").exists()


def test_val_classes_differ_is_an_error_before_training(tmp_path, tiny_train, capsys):
    root = write_folder(tmp_path / "data", ("a", "b", "c"), ("a", "b", "d"), odd_in=None)
    rc, out = run_cli(
        tiny_train("--dataset", "folder", "--data-dir", str(root), "-b", "4", fmnist=False), capsys
    )
    assert rc == 2
    assert "only in train: c" in out and "only in val: d" in out
    assert "same class folders" in out
    assert not list((tmp_path / "runs").rglob("ckpt-*.pt"))  # nothing trained


def test_empty_class_folder_is_named(tmp_path, tiny_train, capsys):
    root = write_folder(tmp_path / "data", odd_in=None)
    (root / "train" / "empty").mkdir()
    (root / "val" / "empty").mkdir()
    rc, out = run_cli(tiny_train("--dataset", "folder", "--data-dir", str(root), fmnist=False), capsys)
    assert rc == 2
    assert "empty" in out and "hold no image files" in out and "remove them or add images" in out


def _fmnist_copy(tmp_path):
    src = "/usr/share/datasets/fashion-mnist"
    d = tmp_path / "fm"
    shutil.copytree(src, d)
    return d


@pytest.mark.parametrize(
    "damage, expect",
    [
        ("truncate_gz", "truncated or corrupt"),  # half a gzip stream
        ("truncate_payload", "the header says"),  # a valid gzip of a short IDX
        ("wrong_kind", "bad magic number"),  # a PNG renamed to the IDX name
        ("labels_for_images", "bad magic number"),  # the label file where the image file should be
    ],
)
def test_fashion_mnist_damaged(tmp_path, tiny_train, capsys, damage, expect):
    d = _fmnist_copy(tmp_path)
    img = d / "train-images-idx3-ubyte.gz"
    raw = img.read_bytes()
    if damage == "truncate_gz":
        img.write_bytes(raw[: len(raw) // 3])
    elif damage == "truncate_payload":
        img.write_bytes(gzip.compress(gzip.decompress(raw)[:5000]))
    elif damage == "wrong_kind":
        img.write_bytes(gzip.compress(odd_files()["plain.jpg"][0]))
    else:
        shutil.copy(d / "train-labels-idx1-ubyte.gz", img)
    rc, out = run_cli(tiny_train("--data-dir", str(d)), capsys)
    assert rc == 2
    assert expect in out and "train-images-idx3-ubyte" in out, out
