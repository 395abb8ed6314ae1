import argparse
import re

import pytest
import yaml

from davit.models import DEFAULT_DROP_PATH
from davit.train.config import (
    PRESETS,
    TrainConfig,
    add_config_args,
    config_from_args,
    finalize,
    resolve_config,
    save_config,
)
from davit.train.setup import build_model


def test_imagenet_preset_equals_spec():
    c = resolve_config("imagenet")
    # SPEC 5: global batch 1024 (8 x 128), AdamW lr 1e-3 at 1024, betas, eps, wd 0.05
    assert (c.batch_size, c.lr, c.lr_base_size, c.opt) == (128, 1e-3, 1024, "adamw")
    assert (c.opt_betas, c.opt_eps, c.weight_decay) == ([0.9, 0.999], 1e-8, 0.05)
    # 300 epochs cosine to 1e-5 after 5 warmup epochs from 1e-6, then 10 cooldown epochs
    assert (c.sched, c.epochs, c.warmup_epochs, c.warmup_lr, c.min_lr, c.cooldown_epochs) == (
        "cosine",
        300,
        5,
        1e-6,
        1e-5,
        10,
    )
    assert c.clip_grad == 1.0 and c.amp
    assert (c.scale, c.interpolation, c.hflip, c.aa) == ([0.08, 1.0], "bicubic", 0.5, "rand-m9-mstd0.5-inc1")
    assert (c.mixup, c.cutmix, c.mixup_switch_prob, c.smoothing) == (0.8, 1.0, 0.5, 0.1)
    assert (c.reprob, c.remode, c.model_ema, c.crop_pct) == (0.25, "pixel", False, 0.9)
    assert c.mean == [0.485, 0.456, 0.406] and c.std == [0.229, 0.224, 0.225]
    assert c.img_size == 224 and c.drop_path is None


@pytest.mark.parametrize("variant,rate", [("davit_tiny", 0.1), ("davit_small", 0.2), ("davit_base", 0.4)])
def test_imagenet_preset_drop_path_per_variant(variant, rate):
    import torch

    assert DEFAULT_DROP_PATH[variant] == rate
    cfg = resolve_config("imagenet", None, {"model": variant})
    assert finalize(cfg).drop_path == rate  # what config.yaml records
    with torch.device("meta"):
        m = build_model(cfg, 1000, 3, verbose=False)
    rates = [mod.p for mod in m.modules() if type(mod).__name__ == "DropPath"]
    assert max(rates) == pytest.approx(rate)


def test_presets_resolve():
    for name in PRESETS:
        assert isinstance(resolve_config(name), TrainConfig)


def test_cli_flags_override_preset_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.005\nepochs: 7\n")
    p = argparse.ArgumentParser()
    add_config_args(p)
    cfg = config_from_args(
        p.parse_args(
            [
                "--preset",
                "imagenet",
                "--config",
                str(f),
                "--epochs",
                "9",
                "-b",
                "32",
                "--model-ema",
                "--clip-grad",
                "none",
            ]
        )
    )
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.model_ema, cfg.clip_grad) == (0.005, 9, 32, True, None)
    assert cfg.mixup == 0.8  # untouched preset value


def test_timm_defaults_cooldown_and_absolute_lr(tmp_path):
    """As in timm: no cooldown epochs unless asked (the imagenet preset asks for the recipe's 10), and an lr
    given without --lr-base-size is the learning rate itself, not scaled by the preset's batch rule."""
    p = argparse.ArgumentParser()
    add_config_args(p)

    def cfg(*argv):
        return config_from_args(p.parse_args(list(argv)))

    assert TrainConfig().cooldown_epochs == 0 and cfg().cooldown_epochs == 0
    assert cfg("--preset", "imagenet").cooldown_epochs == 10
    assert (cfg("--preset", "imagenet").lr, cfg("--preset", "imagenet").lr_base_size) == (1e-3, 1024)
    assert cfg("--preset", "imagenet", "--lr", "5e-4").lr_base_size is None  # absolute
    assert cfg("--preset", "imagenet", "--lr", "5e-4", "--lr-base-size", "256").lr_base_size == 256
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.0005\n")
    assert cfg("--preset", "imagenet", "--config", str(f)).lr_base_size is None
    # a run's saved config holds both keys: repeating it scales as the run did
    save_config(cfg("--preset", "imagenet"), tmp_path / "run.yaml", {"world_size": 8})
    assert cfg("--config", str(tmp_path / "run.yaml")).lr_base_size == 1024


def test_config_yaml_round_trip(tmp_path):
    cfg = resolve_config("fashion-mnist", None, {"lr": 3e-3, "model_kwargs": {"window_size": 4}})
    save_config(cfg, tmp_path / "config.yaml", {"world_size": 1})
    assert resolve_config(None, str(tmp_path / "config.yaml")) == cfg


def test_unknown_key_is_clear_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.001\nwarmup_epoch: 5\n")
    with pytest.raises(ValueError, match=r"unknown config key 'warmup_epoch'.*warmup_epochs"):
        resolve_config(None, str(f))


@pytest.mark.parametrize(
    "text,match",
    [
        ("lr: fast\n", r"'lr' has the wrong type.*expected float"),
        ("lr: nan\n", r"'lr' has the wrong type.*expected float"),
        ("epochs: 2.5\n", r"'epochs' has the wrong type.*int"),
        ("model_ema: 1\n", r"'model_ema' has the wrong type.*bool"),
        ("- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_wrong_types_are_clear_errors(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        resolve_config(None, str(f))


@pytest.mark.parametrize(
    "over,message",
    [
        ({"epochs": 0}, "--epochs must be > 0, got 0"),
        ({"time_budget": 0}, "--time-budget must be > 0, got 0.0; leave it out for the default"),
        ({"warmup_epochs": -1}, "--warmup-epochs must be >= 0, got -1"),
        ({"lr": 0}, "--lr must be > 0, got 0"),
        ({"max_steps": 0}, "--max-steps must be >= 1, got 0"),
        ({"model_ema_decay": 1.0}, "--model-ema-decay must be between 0 and 1"),
    ],
)
def test_values_no_run_can_use_are_refused_by_flag(over, message):
    # each used to pass: --epochs 0 wrote an empty report, --time-budget 0 ran without a budget
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_config("fashion-mnist", None, over)
    # the edges that mean something stay allowed: no warmup, no clipping, no workers
    resolve_config("fashion-mnist", None, {"warmup_epochs": 0, "clip_grad": 0, "workers": 0})


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads `2e-3` as the string "2e-3"; the user meant the float
    f = tmp_path / "c.yaml"
    f.write_text("lr: 2e-3\nmin_lr: 1E-6\n")
    cfg = resolve_config(None, str(f))
    assert (cfg.lr, cfg.min_lr) == (2e-3, 1e-6) and isinstance(cfg.lr, float)


def test_saved_yaml_is_plain(tmp_path):
    save_config(resolve_config("imagenet"), tmp_path / "c.yaml")
    d = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert d["lr"] == 1e-3 and d["aa"] == "rand-m9-mstd0.5-inc1"
