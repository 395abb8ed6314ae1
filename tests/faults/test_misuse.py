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
    assert rc == 2 and "fewer batches" in out and "use a smaller batch" in out, out
