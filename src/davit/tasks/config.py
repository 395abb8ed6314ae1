"""Configuration and presets of the dense tasks (SPEC section 6 for the COCO / ADE20K recipes).

One flat dataclass for both tasks; a preset is a dict of overrides, then a YAML/JSON config file, then
``--set key=value`` pairs. Detection durations are in epochs (``lr_steps`` too), segmentation in iterations.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.config import check_value, refuse_out_of_range

__all__ = ["TaskConfig", "PRESETS", "resolve_task_config", "parse_set"]


@dataclass
class TaskConfig:
    task: str = "detect"  # detect | segment
    model: str = "davit_tiny"
    backbone_kwargs: dict = field(default_factory=dict)  # architecture overrides, e.g. {"stem_stride": 4}
    backbone_weights: str | None = None  # classification or mmdet/mmseg checkpoint
    drop_path_rate: float = 0.1
    # data: `data` is a scenes-style root (images/{split}, labels/{split}, annotations/instances_*.json);
    # the explicit folders below override it (COCO: image dir + instances JSON; ADE20K: image dir + label dir)
    data: str | None = None
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    num_classes: int | None = None  # detect: max category id + 1 (from the JSON); segment: label classes
    reduce_zero_label: bool = False
    # detection model and its internal resize (short sides drawn per image in training, the last one at test)
    min_sizes: list = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    # the official pipeline's second policy, drawn for half the images (AutoAugment of two): short side 400,
    # 500 or 600, a random 384..600 crop, then the multi-scale resize above (coco.ResizeCrop)
    crop_prob: float = 0.0
    crop_short_sides: list = field(default_factory=lambda: [400, 500, 600])
    crop_size_range: list = field(default_factory=lambda: [384, 600])
    fpn_channels: int = 256
    box_head_dim: int = 1024
    mask_head_channels: int = 256
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000  # mmdet's rpn_proposal max_per_img (torchvision's default: 2000)
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    detections_per_img: int = 100
    # segmentation model, augmentation and test
    channels: int = 512
    aux_channels: int = 256
    aux_weight: float = 0.4
    dropout: float = 0.1  # before both heads' classifiers (mmseg dropout_ratio)
    crop_size: int = 512
    scale: list = field(default_factory=lambda: [2048, 512])
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    test_mode: str = "whole"  # whole | slide
    test_crop: int = 512
    test_stride: int = 341
    # test passes: with test_resize, ratios of `scale` (each image rescaled keeping its aspect ratio to fit
    # scale x ratio, as mmseg's test pipeline; its multi-scale test uses 0.5..1.75), else of the image size
    test_scales: list = field(default_factory=lambda: [1.0])
    test_resize: bool = True  # run folders written before this key existed load with False (their meaning)
    test_flip: bool = False
    flip_prob: float = 0.5  # training horizontal flip (both tasks)
    photometric: bool = True  # segmentation: colour jitter in training
    cache_images: bool = False  # segmentation: keep decoded images/labels in memory (small datasets only)
    # optimisation
    batch_size: int = 16  # global (split over DDP ranks)
    epochs: float | None = None  # detection
    iters: int | None = None  # segmentation
    lr: float = 1e-4
    weight_decay: float = 0.05
    # the official DaViT mmdet/mmseg configs decay every parameter (no paramwise_cfg); False exempts the 1-D
    # ones (norms, biases) as the classification recipe does
    decay_1d_params: bool = True
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "step"  # step (lr_steps, gamma) | poly (power, min_lr)
    lr_steps: list = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    poly_power: float = 1.0
    min_lr: float = 0.0
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    grad_clip: float | None = None
    amp: bool = False  # bf16 autocast in training (CPU and GPU; CUDA's fp16 default would need a grad scaler)
    # running
    eval_interval: int = 0  # iterations; 0: only at the end
    eval_batch_size: int = 1
    log_interval: int = 20
    keep_checkpoints: int = 2
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    time_limit_min: float | None = None  # stop training early (then evaluate) after this many minutes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_COCO = dict(
    task="detect",
    model="davit_tiny",
    num_classes=91,
    crop_prob=0.5,
    lr=1e-4,
    weight_decay=0.05,
    batch_size=16,
    warmup_iters=500,
    warmup_ratio=0.001,
    schedule="step",
    gamma=0.1,
    eval_batch_size=2,
)
# the mmseg UperNet schedule: poly(1.0) decay to 0 after a linear warmup
_UPERNET = dict(task="segment", schedule="poly", poly_power=1.0, min_lr=0.0)
# the CPU demos on `davit data scenes`: ten-minute runs
_CPU_DEMO = dict(
    log_interval=10,
    workers=1,
    threads=0,  # 0 = all cores, or 1 when the machine is already busy (davit.train.demo.pick_threads)
    time_limit_min=13.0,  # training; with evaluation and drawing the demo ends within 15 minutes
)
PRESETS: dict[str, dict[str, Any]] = {
    # Mask R-CNN, official mmdet configs: 2 img/GPU x 8, AdamW 1e-4 wd 0.05, 12 / 36 epochs
    "coco-maskrcnn-1x": dict(_COCO, epochs=12, lr_steps=[8, 11], drop_path_rate=0.1),
    "coco-maskrcnn-3x": dict(_COCO, epochs=36, lr_steps=[27, 33], drop_path_rate=0.2),
    # UperNet, official mmseg config: AdamW 6e-5 wd 0.01, poly(1.0) with 1500 warmup, 160k iters, batch 16
    "ade20k-upernet-160k": dict(
        _UPERNET,
        model="davit_tiny",
        num_classes=150,
        reduce_zero_label=True,
        drop_path_rate=0.3,
        lr=6e-5,
        weight_decay=0.01,
        warmup_iters=1500,
        warmup_ratio=1e-6,
        iters=160_000,
        batch_size=16,
        crop_size=512,
        scale=[2048, 512],
        ratio_range=[0.5, 2.0],
        eval_interval=16_000,
        test_mode="whole",
    ),
    # CPU demos on `davit data scenes` (128 px canvases): the same recipes scaled down in size and length
    "scenes-maskrcnn-demo": dict(
        _CPU_DEMO,
        task="detect",
        model="davit_atto",
        backbone_kwargs={"stem_stride": 4},  # 128 px canvases: strides 4..64 as the COCO model
        num_classes=11,
        drop_path_rate=0.0,
        lr=1e-3,
        weight_decay=0.05,
        decay_1d_params=False,  # as measured (docs/benchmarks.md); the COCO recipe decays every parameter
        batch_size=8,
        epochs=4,
        lr_steps=[3, 3.6],
        warmup_iters=50,
        warmup_ratio=0.01,
        min_sizes=[96, 112, 128],
        max_size=200,
        fpn_channels=64,
        box_head_dim=256,
        mask_head_channels=64,
        rpn_batch_size_per_image=128,
        box_batch_size_per_image=64,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        detections_per_img=20,  # scenes hold at most 5 items
        eval_batch_size=8,
    ),
    "scenes-upernet-demo": dict(
        _UPERNET,
        # augmented in the training process itself: a worker process beside the two compute threads cost
        # more than it gave (steps 200-400 of a run: 30.8-33.6 img/s with the cache, against 27.1-27.3 with
        # one worker and 24.1-25.2 uncached; docs/benchmarks.md)
        **{**_CPU_DEMO, "workers": 0},
        model="davit_atto",
        # strides 4..32 as the ADE20K model; with the variant's stride-2 stem the 3x3 fusion conv of the head
        # runs at 64x64 and a training step of 8 crops took 3.2 s instead of 0.9 s (one thread). The two-conv
        # stem of the classification demo (conv_stem): mIoU 0.534 and 0.539 against 0.521 and 0.530 with the
        # released 7x7 conv, in 13 minutes each, with fewer iterations; one block per stage, as that demo
        # too: 0.574 with 32% more iterations in the same 13 minutes (docs/benchmarks.md, sessions 10-11).
        # The backbone is the four-stage form of the Fashion-MNIST demo classifier (which has three since
        # session 17): a classifier trained with depths [1, 1, 1, 1] loads into it (README)
        backbone_kwargs={"stem_stride": 4, "conv_stem": True, "depths": [1, 1, 1, 1]},
        num_classes=11,
        drop_path_rate=0.0,
        # batches of 16 at lr 3e-3: 15-36% more crops per second than batches of 8 (fewer, larger steps;
        # the VM's speed moved too) and mIoU 0.554-0.575 (three 13-minute runs) against 0.542-0.551 for
        # batches of 8 at 2e-3 (two runs) in the same two hours; batches of 32 at 4e-3: 0.533 (session 12).
        # At batch 8, 2e-3 beat 1e-3: 0.204 vs 0.182 mIoU after 600 iterations (session 4;
        # docs/benchmarks.md)
        lr=3e-3,
        weight_decay=0.01,
        decay_1d_params=False,  # as measured (docs/benchmarks.md); the ADE20K recipe decays every parameter
        warmup_iters=50,
        warmup_ratio=0.01,
        iters=6000,  # an upper bound: the 13-minute limit ends the schedule first on this CPU
        batch_size=16,
        channels=64,
        aux_channels=32,
        # train and test at half the canvas size: the items are 28 px images drawn at 26-58 px on the 128 px
        # canvases, so at 64 px they keep their detail while a step costs ~2.4x less; in the same 13 minutes
        # mIoU 0.414 (2830 iterations) against 0.367 at full size (1290)
        crop_size=64,
        scale=[64, 64],
        ratio_range=[0.75, 1.5],
        # mmseg's multi-scale + flip test at the two ends of the training scales (0.375-0.75 of the canvas):
        # the session-5 demo model scored 0.434 at 0.5 of the canvas alone, 0.456 at 0.75, 0.486 with both
        # and flips, at ~7 s for the 150 held-out scenes (docs/benchmarks.md). Ratios of `scale` (64 px):
        # 64 and 96 px passes on the 128 px canvases
        test_scales=[1.0, 1.5],
        test_flip=True,
        eval_batch_size=16,
        # the 1500 scenes decoded once and kept (~100 MB)
        cache_images=True,
    ),
}


def parse_set(pairs: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-4", "min_sizes=[96,128]"]`` -> dict; values are read as YAML (numbers, lists, null)."""
    import yaml

    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def resolve_task_config(
    task: str,
    preset: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> TaskConfig:
    """Defaults < preset < config file < overrides, with unknown keys and a task mismatch reported."""
    values: dict[str, Any] = {"task": task}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if config_file is not None:
        p = Path(config_file)
        if not p.is_file():
            raise FileNotFoundError(f"config file {config_file!r} not found")
        import yaml

        loaded = (json.loads if p.suffix == ".json" else yaml.safe_load)(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {config_file} must hold a mapping of option: value")
        values.update(loaded)
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(TaskConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        close = {u: difflib.get_close_matches(u, known, n=1, cutoff=0.6) for u in unknown}
        hint = "".join(f" Did you mean {c[0]!r} for {u!r}?" for u, c in close.items() if c)
        raise ValueError(f"unknown option(s) {unknown}.{hint} Known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(TaskConfig)
    cfg = TaskConfig(**{k: check_value(k, v, hints[k]) for k, v in values.items()})
    if cfg.task != task:
        raise ValueError(f"config is for task {cfg.task!r} but `davit {task}` was run; pick a {task} preset")
    if cfg.task == "detect" and not cfg.epochs:
        raise ValueError("detection needs `epochs` (e.g. --preset coco-maskrcnn-1x or --set epochs=12)")
    if cfg.task == "segment" and not cfg.iters:
        raise ValueError("segmentation needs `iters` (e.g. --preset ade20k-upernet-160k or --set iters=1000)")
    if cfg.schedule not in ("step", "poly"):
        raise ValueError(f"schedule must be 'step' or 'poly', got {cfg.schedule!r}")
    check_ranges(cfg)
    return cfg


# (option, smallest allowed value, whether that value itself is allowed): a zero or negative count would
# otherwise run a demo that trains nothing and then overwrites its run folder with an empty evaluation
_RANGES = [
    ("batch_size", 1, True), ("eval_batch_size", 1, True), ("epochs", 0, False), ("iters", 1, True),
    ("lr", 0, False), ("warmup_iters", 0, True), ("crop_size", 1, True), ("test_crop", 1, True),
    ("test_stride", 1, True), ("max_size", 1, True), ("channels", 1, True), ("aux_channels", 1, True),
    ("aux_weight", 0, True), ("log_interval", 1, True), ("keep_checkpoints", 1, True), ("workers", 0, True),
    ("eval_interval", 0, True), ("time_limit_min", 0, False),
]


def check_ranges(cfg: TaskConfig) -> None:
    """Refuse values no run can use, naming the option and what it accepts."""
    # no "leave it out" hint: epochs / iters / time_limit_min default to None but a run needs its preset's
    refuse_out_of_range(cfg, _RANGES, str, hint_optional=False)
    for name in ("min_sizes", "test_scales", "scale", "ratio_range"):
        v = getattr(cfg, name)
        if not v or any(not isinstance(x, (int, float)) or x <= 0 for x in v):
            raise ValueError(f"{name} must be a non-empty list of positive numbers, got {v!r}")
    if cfg.ratio_range[0] > cfg.ratio_range[-1]:
        raise ValueError(f"ratio_range must be [low, high] with low <= high, got {cfg.ratio_range}")
