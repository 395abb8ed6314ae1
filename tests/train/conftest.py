"""A tiny DaViT (16 channels, 16 px) and tiny datasets keep every training test to seconds on 2 cores."""

from __future__ import annotations

import pytest

from davit.train.config import resolve_config

TINY = dict(
    model="davit_atto",
    img_size=16,
    in_chans=1,
    num_classes=10,
    simple_aug=True,
    model_kwargs={
        "depths": [1, 1, 1, 1],
        "embed_dims": [16, 16, 16, 16],
        "num_heads": [1, 1, 1, 1],
        "window_size": 4,
    },
    dataset="fashion-mnist",
    train_samples=64,
    val_samples=32,
    batch_size=16,
    workers=0,
    epochs=2,
    warmup_epochs=0.5,
    cooldown_epochs=0,
    lr=2e-3,
    drop_path=0.1,
    smoothing=0.1,
    log_interval=1,
    progress="none",
    tensorboard=False,
    seed=3,
    device="cpu",
)


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(**over):
        return resolve_config(None, None, {**TINY, "output": str(tmp_path / "runs"), **over})

    return make
