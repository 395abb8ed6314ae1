"""The training configuration: one flat dataclass whose field names are timm's flag names, presets, YAML I/O.

Resolution order (later wins): dataclass defaults < ``--preset`` < ``--config FILE.yaml`` < flags given on the
command line. The fully resolved config is written to the run folder as ``config.yaml``; passing that
file back with ``--config`` repeats the run, in a new run folder (its ``experiment`` and ``resume`` are not
carried over, see :func:`load_config_file`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "TrainConfig",
    "check_value",
    "PRESETS",
    "resolve_config",
    "load_config_file",
    "save_config",
    "add_config_args",
    "config_from_args",
    "finalize",
]


@dataclass
class TrainConfig:
    # model
    model: str = "davit_tiny"
    num_classes: int | None = None  # default: the dataset's class count
    in_chans: int | None = None  # default: 1 for Fashion-MNIST, else 3
    img_size: int | None = None  # default: the variant's input size
    window_size: int | None = None  # override the variant's attention window (e.g. 12 at 384 px)
    model_kwargs: dict = field(default_factory=dict)  # other create_model architecture overrides
    drop_path: float | None = None  # default: the official per-variant rate (SPEC 5), else 0
    drop: float = 0.0
    initial_checkpoint: str | None = None  # fine-tune from these weights (any layout davit.weights reads)
    pretrained: bool = False  # start from the variant's released weights (hub cache; --model may carry a tag)
    grad_checkpointing: bool = False
    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_samples: int | None = None  # use only the first N training images (quick runs, tests)
    val_samples: int | None = None
    workers: int = 2
    simple_aug: bool = (
        False  # small-image augmentation (pad + random crop + flip) instead of RandomResizedCrop
    )
    batch_aug: bool = False  # Fashion-MNIST only: augment uint8 batches at once (fast on small CPUs)
    crop_padding: int | None = None  # simple_aug: zero padding before the random crop (default: size / 8)
    scale: list = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    color_jitter: float | None = None
    aa: str | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    crop_pct: float | None = None  # eval crop; default: the variant's metadata
    interpolation: str = "bicubic"
    mean: list | None = None
    std: list | None = None
    # optimisation
    opt: str = "adamw"
    batch_size: int = 128  # per process
    # evaluation batch per process (default: batch_size); larger batches evaluate faster on a CPU
    validation_batch_size: int | None = None
    grad_accum_steps: int = 1
    lr: float = 1e-3
    # scale lr linearly by global batch / lr_base_size when set (presets); an lr given without it, on the
    # command line or in a config file, is absolute, as timm's --lr (see resolve_config)
    lr_base_size: int | None = None
    opt_eps: float = 1e-8
    opt_betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05
    layer_decay: float | None = None
    clip_grad: float | None = 1.0
    sched: str = "cosine"
    epochs: int = 300
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0  # timm's default; the imagenet preset sets the recipe's 10
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # precision / speed
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    torchcompile: bool = False
    fsdp: bool = False
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    time_budget: float | None = None  # seconds for the whole run: the number of epochs is chosen to fit
    max_epoch_steps: int | None = (
        None  # cap on optimizer steps per epoch (set by time_budget on slow machines)
    )
    # re-plans of a time-budgeted run, made at epoch ends from the speed measured in the epoch (written by
    # the trainer so that config.yaml repeats the run): [epoch, step, epochs, cap] = from `epoch` on (begun
    # at optimizer step `step`) the run has `epochs` epochs of `cap` steps (0: all), the lr schedule's rest
    # spread over them
    replans: list = field(default_factory=list)
    # run management
    output: str = "output/train"
    experiment: str | None = None  # run folder name (default: model-dataset-timestamp)
    resume: str | None = None  # a checkpoint file, or "auto" = newest valid one in the run folder
    seed: int = 42
    keep_last: int = 2
    checkpoint_every_steps: int | None = None  # also save mid-epoch every N steps
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps
    log_interval: int = 10  # steps between train records in metrics.jsonl / TensorBoard
    print_interval: int = 50  # steps between plain progress lines (when not on a terminal)
    tensorboard: bool = True
    progress: str = "auto"  # auto (rich bar on a terminal, plain lines otherwise), rich, plain, none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# SPEC section 5: the official ImageNet-1k recipe, flag for flag. Per-variant drop path comes from
# DEFAULT_DROP_PATH when drop_path stays None.
_IMAGENET = dict(
    dataset="folder",
    batch_size=128,
    lr=1e-3,
    lr_base_size=1024,
    opt="adamw",
    opt_eps=1e-8,
    opt_betas=[0.9, 0.999],
    weight_decay=0.05,
    sched="cosine",
    epochs=300,
    warmup_epochs=5,
    warmup_lr=1e-6,
    min_lr=1e-5,
    cooldown_epochs=10,
    clip_grad=1.0,
    amp=True,
    simple_aug=False,
    scale=[0.08, 1.0],
    interpolation="bicubic",
    hflip=0.5,
    aa="rand-m9-mstd0.5-inc1",
    mixup=0.8,
    cutmix=1.0,
    mixup_prob=1.0,
    mixup_switch_prob=0.5,
    smoothing=0.1,
    reprob=0.25,
    remode="pixel",
    model_ema=False,
    crop_pct=0.9,
    mean=[0.485, 0.456, 0.406],
    std=[0.229, 0.224, 0.225],
    drop_path=None,
    img_size=224,
)

PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": _IMAGENET,
    # ImageNet-22k pre-training (21841 classes): the same recipe, 90 epochs (as Swin/DaViT 22k runs)
    "imagenet22k": {
        **_IMAGENET,
        "num_classes": 21841,
        "epochs": 90,
        "warmup_epochs": 5,
        "cooldown_epochs": 0,
        "weight_decay": 0.05,
        "lr": 1e-3,
        "lr_base_size": 1024,
    },
    # 22k -> 1k fine-tuning at 384 px (paper's B/L results): small lr, short schedule, no mixup warm-up
    "finetune-384": {
        **_IMAGENET,
        "img_size": 384,
        "num_classes": 1000,
        "epochs": 30,
        "warmup_epochs": 5,
        "cooldown_epochs": 0,
        "lr": 2e-5,
        "lr_base_size": 512,
        "min_lr": 2e-7,
        "warmup_lr": 2e-8,
        "weight_decay": 1e-8,
        "layer_decay": 0.9,
        "crop_pct": 1.0,
        "mixup": 0.0,
        "cutmix": 0.0,
    },
    # the CPU demo: a small DaViT trained from scratch on Fashion-MNIST (see docs/benchmarks.md)
    "fashion-mnist": dict(
        dataset="fashion-mnist",
        model="davit_atto",
        # stem stride 4 (7/4/2 token maps): 2.6x cheaper per step than the variant's stride 2 and, in a
        # 150 s probe, as accurate per second; the two-conv stem: +1.5 points top-1 in a 240 s probe at the
        # same step time; one block per stage: 20% cheaper steps, +0.4 points in a 240 s probe and in a
        # 10-minute demo run; three stages: the fourth ran on 1x1 maps and cost ~30% of a step for 75% of the
        # parameters; without it 1.38x the steps and 91.88 / 91.80% in two 10-minute runs against 91.04-91.73%
        # for the four-stage model on the same VM (docs/benchmarks.md, session 17)
        model_kwargs={
            "stem_stride": 4,
            "conv_stem": True,
            "depths": [1, 1, 1],
            "embed_dims": [32, 64, 128],
            "num_heads": [1, 2, 4],
        },
        img_size=28,
        in_chans=1,
        num_classes=10,
        simple_aug=True,
        batch_aug=True,  # augment whole uint8 batches: no per-image Python in the 10-minute budget
        # no crops: within ~3 epochs random crops cost more accuracy than they add (76 vs 84% in the probe)
        crop_padding=0,
        hflip=0.5,
        aa=None,
        # random erasing: +0.23 points over 12 epochs (92.49 vs 92.26%, a fixed schedule), where the model
        # starts to overfit; no change in the ~8-9 epochs the 10-minute demo trains on the 2-core Intel VM
        # (make demo in the same hour: 91.56 vs 91.51%; 91.79 vs 91.80/91.88% in session 17's probes).
        # ~0.7 ms per batch of 64 (timm's per-image loop): ~1% of a step (docs/benchmarks.md, session 18)
        reprob=0.25,
        mixup=0.0,
        cutmix=0.0,
        smoothing=0.1,
        batch_size=64,  # twice the updates of 128 in the same time; 84.5 vs 83.8% in the probe
        validation_batch_size=512,  # 1.5x the img/s of 64 in evaluation: ~2% more of the budget trains
        lr=2e-3,
        lr_base_size=None,
        weight_decay=0.05,
        epochs=4,
        warmup_epochs=0.25,
        warmup_lr=1e-5,
        min_lr=1e-5,
        cooldown_epochs=0,
        clip_grad=1.0,
        drop_path=0.0,
        model_ema=False,
        amp=False,
        crop_pct=1.0,
        workers=0,
        log_interval=5,
        keep_last=1,
    ),
}


# ----- type checking of config values ------------------------------------------------------------
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def check_value(name: str, value: Any, hint: Any) -> Any:
    """Return ``value`` converted to the field's type, or raise a ValueError naming the field and the type."""
    args = typing.get_args(hint)
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = [a for a in args if a is not type(None)] if is_union else [hint]
    if value is None:
        if is_union and type(None) in args:
            return None
        raise ValueError(f"config key '{name}' may not be null; expected {_type_name(hint)}")
    for t in allowed:
        if t is bool:
            if isinstance(value, bool):
                return value
        elif t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif t is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                # YAML 1.1 reads `2e-3` (no dot) as a string; it is still the number the user meant
                # (only finite numbers: "nan" or "inf" stay a type error)
                try:
                    f = float(value)
                except ValueError:
                    f = math.nan
                if math.isfinite(f):
                    return f
        elif t is str:
            if isinstance(value, str):
                return value
        elif t in (list, dict) or typing.get_origin(t) in (list, dict):
            base = typing.get_origin(t) or t
            if isinstance(value, (list, tuple)) and base is list:
                return list(value)
            if isinstance(value, dict) and base is dict:
                return dict(value)
    raise ValueError(
        f"config key '{name}' has the wrong type: got {value!r} ({type(value).__name__}), "
        f"expected {_type_name(hint)}"
    )


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
    return getattr(hint, "__name__", str(hint))


def _check_keys(d: dict[str, Any], where: str) -> None:
    names = [f.name for f in fields(TrainConfig)]
    for k in d:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"{where}: unknown config key '{k}'.{hint} Valid keys: see `davit train --help`."
            )


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], where: str) -> TrainConfig:
    _check_keys(overrides, where)
    hints = _hints()
    checked = {k: check_value(k, v, hints[k]) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **checked)


# the keys that name a run folder rather than a setting of the run
RUN_IDENTITY = ("experiment", "resume")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The config keys of a YAML file, checked; from a run's saved config.yaml without RUN_IDENTITY."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of config keys to values, got {type(data).__name__}")
    if data.pop("_resolved", None) is not None:
        # a run's own config.yaml (save_config writes this block): repeating it is a new run with the same
        # settings, so the keys naming that run's folder are left out; otherwise the repeat would write into
        # the finished run's folder or, with its `resume: auto`, resume it. --experiment/--resume given on
        # the command line still choose a run folder.
        for k in RUN_IDENTITY:
            data.pop(k, None)
    _check_keys(data, str(p))
    return data


def save_config(cfg: TrainConfig, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config; ``extra`` (derived facts such as world size) goes under ``_resolved``."""
    d = cfg.to_dict()
    if extra:
        d["_resolved"] = extra
    from .checkpoint import atomic_write

    # atomic: a budget run rewrites it at each re-plan, and a kill mid-write must not leave half a file
    atomic_write(path, yaml.safe_dump(d, sort_keys=False).encode())


def resolve_config(
    preset: str | None = None, config_file: str | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    cfg = TrainConfig()
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        cfg = apply_overrides(cfg, PRESETS[preset], f"preset {preset}")
    if config_file:
        cfg = apply_overrides(cfg, _absolute_lr(load_config_file(config_file)), str(config_file))
    if overrides:
        cfg = apply_overrides(cfg, _absolute_lr(overrides), "command line")
    check_ranges(cfg)
    return cfg


# (key, smallest allowed value, whether that value itself is allowed); None (not given) always passes.
# Zero and negative values used to pass silently: `--epochs 0` wrote an empty report, `--time-budget 0` and
# `--warmup-epochs -1` ran as if left out
_RANGES = [
    ("epochs", 0, False), ("batch_size", 1, True), ("validation_batch_size", 1, True),
    ("grad_accum_steps", 1, True), ("lr", 0, False), ("warmup_epochs", 0, True), ("cooldown_epochs", 0, True),
    ("warmup_lr", 0, True), ("min_lr", 0, True), ("weight_decay", 0, True), ("drop_path", 0, True),
    ("drop", 0, True), ("clip_grad", 0, True), ("time_budget", 0, False), ("max_epoch_steps", 1, True),
    ("max_steps", 1, True), ("workers", 0, True), ("img_size", 1, True), ("keep_last", 1, True),
    ("log_interval", 1, True), ("print_interval", 1, True), ("checkpoint_every_steps", 1, True),
    ("threads", 0, True), ("opt_eps", 0, False),
]


def refuse_out_of_range(
    cfg: Any, ranges: list[tuple[str, float, bool]], label: Callable[[str], str], hint_optional: bool
) -> None:
    """Raise a ValueError naming the first value of ``cfg`` (a config dataclass) outside its range: each
    ``(key, low, inclusive)`` of ``ranges`` needs ``value >= low`` (``> low`` when not inclusive); None (not
    given) passes. ``label(key)`` is how the message names it; ``hint_optional`` adds "leave it out for the
    default" for keys whose default is None. Shared by the classification and dense-task configs."""
    fields = type(cfg).__dataclass_fields__
    for key, low, inclusive in ranges:
        v = getattr(cfg, key)
        if v is not None and (v < low if inclusive else v <= low):
            need = f">= {low}" if inclusive else f"> {low}"
            hint = "; leave it out for the default" if hint_optional and fields[key].default is None else ""
            raise ValueError(f"{label(key)} must be {need}, got {v}{hint}")


def check_ranges(cfg: TrainConfig) -> None:
    """Refuse values no run can use, naming the flag (also the config key, with underscores)."""
    refuse_out_of_range(cfg, _RANGES, lambda key: "--" + key.replace("_", "-"), hint_optional=True)
    if not 0 < cfg.model_ema_decay < 1:
        raise ValueError(
            f"--model-ema-decay must be between 0 and 1 (e.g. 0.9998), got {cfg.model_ema_decay}"
        )


def _absolute_lr(d: dict[str, Any]) -> dict[str, Any]:
    """An ``lr`` given without ``lr_base_size`` beside it is the learning rate itself, as timm's --lr: the
    preset's batch scaling (``lr_base_size``) is dropped rather than applied to it: ``--preset imagenet
    --lr 5e-4`` on 2 processes of 128 images trains at 5e-4, not at 5e-4 x 256 / 1024. A run's saved
    config.yaml holds both keys, so repeating it scales as the run did."""
    if "lr" in d and "lr_base_size" not in d:
        return {**d, "lr_base_size": None}
    return d


# ----- argparse ---------------------------------------------------------------------------------------------
_SHORT = {"batch_size": ["-b"], "validation_batch_size": ["-vb"], "workers": ["-j"]}
_HELP = {
    "resume": "checkpoint file, or 'auto' for the newest valid checkpoint of the run folder",
    "preset": "",
    "pretrained": "start from the variant's released weights (Hugging Face hub cache; --model may carry "
    "timm's tag, e.g. davit_tiny.msft_in1k); offline, pass the file with --initial-checkpoint",
    "initial_checkpoint": "fine-tune from this checkpoint file (any layout davit.weights reads)",
    "validation_batch_size": "evaluation batch per process; None: --batch-size",
}


def _parse_bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parse_dict(s: str) -> dict:
    v = yaml.safe_load(s)
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{window_size: 12}}', got {s!r}")
    return v


def _none_or(conv):
    def f(s: str):
        return None if s.lower() in ("none", "null") else conv(s)

    f.__name__ = conv.__name__
    return f


# written by the trainer into a run's config.yaml, not typed: no command-line flag
_NO_FLAG = ("replans",)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size``...), all defaulting to "not given" so that presets
    and config files are only overridden by flags the user actually typed."""
    p.add_argument("--config", default=None, help="YAML file of config keys (e.g. a run's config.yaml)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="start from a named recipe")
    hints = _hints()
    for f in fields(TrainConfig):
        if f.name in _NO_FLAG:
            continue
        hint = hints[f.name]
        flags = [f"--{f.name.replace('_', '-')}", *_SHORT.get(f.name, [])]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        nullable = type(None) in args
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = _HELP.get(f.name, "") + f" (default: {default})"
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_.strip())
        if base is bool:
            # --model-ema / --no-model-ema
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            continue
        origin = typing.get_origin(base) or base
        if origin is list:
            kw.update(nargs="+", type=float)
        elif origin is dict:
            kw.update(type=_parse_dict)
        else:
            kw.update(type=_none_or(base) if nullable else base)
        p.add_argument(*flags, **kw)


def finalize(cfg: TrainConfig) -> TrainConfig:
    """Fill values that depend on the model: drop path None -> the official per-variant rate (SPEC 5)."""
    if cfg.drop_path is None:
        from ..models import DEFAULT_DROP_PATH, split_name

        cfg = dataclasses.replace(cfg, drop_path=DEFAULT_DROP_PATH.get(split_name(cfg.model)[0], 0.0))
    return cfg


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return resolve_config(getattr(args, "preset", None), getattr(args, "config", None), given)
