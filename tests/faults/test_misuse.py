"""Misuse: each mistake is an error that says what was wrong and what to do."""

from __future__ import annotations

import pytest
import torch
from faultkit import run_cli

import davit


def test_unknown_model_suggests_closest(tiny_train, capsys):
    with pytest.raises(ValueError, match="Did you mean 'davit_tiny'"):
        davit.create_model("davit_tinny")
    rc, out = run_cli(tiny_train("--model", "davit_smal"), capsys)
    assert rc == 2 and "Did you mean 'davit_small'" in out, out
    rc, out = run_cli(["info", "davti_base"], capsys)
    assert rc == 2 and "davit_base" in out, out


def test_missing_data_dir(tmp_path, tiny_train, capsys):
    rc, out = run_cli(tiny_train("--dataset", "folder", fmnist=False), capsys)
    assert rc == 2 and "--data-dir" in out, out
    rc, out = run_cli(
        tiny_train("--dataset", "folder", "--data-dir", str(tmp_path / "nope"), fmnist=False), capsys
    )
    assert rc == 2 and "ROOT/train/CLASS" in out, out  # names the layout it expects
    rc, out = run_cli(tiny_train("--data-dir", str(tmp_path / "nope")), capsys)
    assert rc == 2 and "fashion-mnist" in out.lower() and "--data-dir" in out, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tiny_train, capsys):
    rc, out = run_cli(tiny_train("--device", "cuda"), capsys)
    assert rc == 2 and "no CUDA GPU" in out and "--device cpu" in out, out


def test_batch_larger_than_dataset(tiny_train, capsys):
    # 16 training images, batch 64: full batches only, so not one step fits — refused before training
    rc, out = run_cli(tiny_train("-b", "64"), capsys)
    assert rc == 2, out
    assert "--batch-size 64 is larger than the 16 training images" in out, out
    assert "fashion-mnist" in out and "--train-samples 16" in out, out  # where they are
    assert "lower --batch-size to at most 16" in out and "raise --train-samples" in out, out
    assert "Traceback" not in out, out


def test_grad_accum_more_than_batches(tiny_train, capsys):
    # 16 images in batches of 8 = 2 batches an epoch: accumulating 3 of them never makes a step
    rc, out = run_cli(tiny_train("--grad-accum-steps", "3"), capsys)
    assert rc == 2, out
    assert "--grad-accum-steps 3 is more than the 2 batches of --batch-size 8" in out, out
    assert "at most 2" in out, out


def test_batch_larger_than_shard(monkeypatch):
    # 2 processes share 16 images: 8 each, so a batch of 12 fits the data set but not one process's shard
    from davit.train.config import TrainConfig
    from davit.train.setup import build_data

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = TrainConfig(model="davit_atto", train_samples=16, val_samples=8, batch_size=12, workers=0)
    with pytest.raises(ValueError) as e:
        build_data(cfg, distributed=True)
    msg = str(e.value)
    assert "--batch-size 12 is larger than the 8 training images per process" in msg, msg
    assert "16 in" in msg and "over 2 processes" in msg and "at most 8" in msg, msg


def test_batch_aug_conflict_names_the_fix_and_leaves_no_run_folder(tmp_path, tiny_train, capsys):
    rc, out = run_cli(tiny_train("--preset", "fashion-mnist", "--aa", "rand-m9-mstd0.5-inc1"), capsys)
    assert rc == 2 and "--no-batch-aug" in out and "--aa rand-m9-mstd0.5-inc1" in out, out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("size", ["0", "-5"])  # -5 failed inside torch (negative dimension)
def test_a_zero_image_size_is_refused_not_read_as_the_default(size, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["info", "davit_tiny", "--img-size", size], capsys)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--img-size: must be >= 1, got {size}" in err, err


def test_a_misspelt_model_option_names_the_right_one():
    # was a bare "DaViT.__init__() got an unexpected keyword argument 'windowsize'"
    with pytest.raises(TypeError, match=r"unknown model option 'windowsize'\. Did you mean 'window_size'\?"):
        davit.create_model("davit_atto", windowsize=12)
    with pytest.raises(ValueError, match="num_classes must be >= 0"):  # was accepted as "no classifier"
        davit.create_model("davit_atto", num_classes=-1)
    assert davit.create_model("davit_atto", num_classes=0, window_size=4).num_classes == 0
