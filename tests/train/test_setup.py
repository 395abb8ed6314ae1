import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from davit import create_model
from davit.train.checkpoint import find_latest_valid, load_checkpoint
from davit.train.setup import build_model, model_from_metadata
from davit.weights import save_weights


def test_initial_checkpoint_new_head_other_window(tiny_cfg, tmp_path):
    src = create_model("davit_atto", num_classes=10, in_chans=1, **tiny_cfg().model_kwargs)
    save_weights(src, tmp_path / "src.safetensors")
    # 3 classes instead of 10, window 2 instead of 4: the trunk loads unchanged, the classifier is new
    cfg = tiny_cfg(initial_checkpoint=str(tmp_path / "src.safetensors"), window_size=2, num_classes=3)
    m = build_model(cfg, 3, 1, verbose=False)
    assert m.head.fc.out_features == 3 and m.window_size == 2
    sd = src.state_dict()
    for k, v in m.state_dict().items():
        if not k.startswith("head.fc"):
            assert torch.equal(v, sd[k]), k


def test_model_from_metadata_needs_a_model_name(tmp_path):
    m = create_model("davit_atto", num_classes=10, in_chans=1)
    save_weights(m, tmp_path / "plain.safetensors")  # no trainer metadata
    with pytest.raises(ValueError, match="--model"):
        model_from_metadata(str(tmp_path / "plain.safetensors"))
    net, meta = model_from_metadata(str(tmp_path / "plain.safetensors"), model="davit_atto", in_chans=1)
    assert net.num_classes == 10 and meta["crop_pct"] == 1.0


def test_train_and_val_samples_with_tar_shards(tiny_cfg, tmp_path):
    """--train-samples/--val-samples take the first N samples of tar shards too (no indexing needed)."""
    from davit.data import ImageFolder, make_image_folder, write_shards
    from davit.train.setup import build_data

    root = make_image_folder(str(tmp_path / "imgs"), per_class=4, size=(16, 16))
    for split in ("train", "val"):
        write_shards(ImageFolder(root, split), str(tmp_path / "shards" / split), shard_size=5)
    cfg = tiny_cfg(
        dataset="wds", data_dir=str(tmp_path / "shards"), in_chans=3, num_classes=3, batch_size=2
    )
    data = build_data(dataclasses.replace(cfg, train_samples=7, val_samples=6), distributed=False)
    data.train_loader.set_epoch(0)
    assert sum(len(x) for x, _ in data.train_loader) == 6  # 7 samples: 3 full batches of 2
    assert [y.tolist() for _, y in data.val_loader] == [[0, 0], [0, 0], [1, 1]]  # the first 6, in order
    with pytest.raises(ValueError, match="--val-samples must be >= 1"):
        build_data(dataclasses.replace(cfg, val_samples=-1), distributed=False)


def test_validation_batch_size_sets_the_eval_batches_only(tiny_cfg, tmp_path):
    from davit.data import ImageFolder, make_image_folder, write_shards
    from davit.train.setup import build_data

    root = make_image_folder(str(tmp_path / "imgs"), per_class=4, size=(16, 16))
    for split in ("train", "val"):
        write_shards(ImageFolder(root, split), str(tmp_path / "shards" / split), shard_size=5)
    cfg = tiny_cfg(dataset="wds", data_dir=str(tmp_path / "shards"), in_chans=3, num_classes=3, batch_size=2)
    data = build_data(dataclasses.replace(cfg, validation_batch_size=5), distributed=False)
    data.train_loader.set_epoch(0)
    assert {len(x) for x, _ in data.train_loader} == {2}
    assert [len(x) for x, _ in data.val_loader] == [5, 5, 2]  # the 12 val images: 5 + 5 + 2
    data = build_data(cfg, distributed=False)  # left out: the training batch
    assert [len(x) for x, _ in data.val_loader] == [2] * 6


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    args = [
        sys.executable,
        "-m",
        "davit",
        "train",
        "--model",
        "davit_atto",
        "--img-size",
        "16",
        "--in-chans",
        "1",
        "--num-classes",
        "10",
        "--simple-aug",
        "--model-kwargs",
        "{depths: [1, 1, 1, 1], embed_dims: [16, 16, 16, 16], num_heads: [1, 1, 1, 1], window_size: 4}",
        "--train-samples",
        "65536",  # 4096 steps per epoch: a fast CPU must still be in epoch 0 when the signal lands
        "--val-samples",
        "32",
        "-j",
        "0",
        "-b",
        "16",
        "--epochs",
        "3",
        "--log-interval",
        "1",
        "--progress",
        "plain",
        "--no-tensorboard",
        "--device",
        "cpu",
        "--output",
        str(tmp_path),
        "--experiment",
        "sig",
    ]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert p.poll() is None and time.time() - t0 < 300, "training did not start"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-2000:]
    assert "received SIGTERM" in out and "resume with --resume auto" in out
    last = find_latest_valid(Path(tmp_path) / "sig" / "checkpoints")
    st = load_checkpoint(last)
    assert st["step"] >= 2 and st["epoch"] == 0 and st["position"] == st["step"]
