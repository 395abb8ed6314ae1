"""Building the pieces of a run from a TrainConfig: datasets/loaders, the model (with fine-tuning from an
initial checkpoint), and the metadata saved next to the weights so `davit eval`/`predict` can rebuild it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from ..models import DEFAULT_DROP_PATH, create_model, model_info, split_name
from .config import TrainConfig

__all__ = [
    "DataBundle",
    "resolve_data_params",
    "build_data",
    "build_model",
    "weights_metadata",
    "model_from_metadata",
    "check_batch_aug",
    "trainer_checkpoint",
    "trainer_checkpoint_metadata",
]

log = logging.getLogger(__name__)


def _is_fmnist(name: str) -> bool:
    return name.lower().replace("_", "-") in ("fashion-mnist", "fashionmnist", "fmnist")


def resolve_data_params(cfg: TrainConfig) -> dict[str, Any]:
    """Input channels, size, normalisation and eval crop for this config (explicit values win)."""
    info = model_info(cfg.model)
    in_chans = cfg.in_chans or (1 if _is_fmnist(cfg.dataset) else 3)
    img_size = cfg.img_size or info["input_size"][-1]
    if cfg.mean is not None:
        mean, std = list(cfg.mean), list(cfg.std or [])
    elif _is_fmnist(cfg.dataset):
        from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

        mean, std = list(FASHION_MNIST_MEAN) * in_chans, list(FASHION_MNIST_STD) * in_chans
    else:
        mean, std = list(info["mean"]), list(info["std"])
        if in_chans == 1:
            mean, std = [sum(mean) / 3], [sum(std) / 3]
    if cfg.std is not None:
        std = list(cfg.std)
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else info["crop_pct"]
    return dict(
        in_chans=in_chans,
        img_size=img_size,
        mean=mean,
        std=std,
        crop_pct=crop_pct,
        interpolation=cfg.interpolation,
    )


class _Head(Dataset):
    """The first ``n`` items of a dataset. (Not torch's Subset: its ``__getitems__`` would be picked up
    through     the data loader's wrapper and bypass the per-sample seeding.)"""

    def __init__(self, ds: Dataset, n: int) -> None:
        self.ds, self.n = ds, min(n, len(ds))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds[i]


def _head(ds: Dataset, n: int, flag: str) -> Dataset:
    """The first ``n`` samples: tar shards (iterable, no indexing) cut their own stream short."""
    if n < 1:
        raise ValueError(f"{flag} must be >= 1, got {n}; leave it out to use every sample")
    if isinstance(ds, IterableDataset):
        if not hasattr(ds, "head"):
            raise ValueError(f"{flag} is not supported for {type(ds).__name__}; leave it out")
        return ds.head(n)
    return _Head(ds, n)


@dataclass
class DataBundle:
    train_loader: Any
    val_loader: Any
    classes: list[str]
    params: dict[str, Any]


def _check_batch_fits(cfg: TrainConfig, train_ds: Dataset, train_loader) -> None:
    """Training drops the last partial batch, so a batch larger than the (per-process) training set gives
    epochs of no step: refuse it before the model is built, with the sizes and what to do."""
    if train_loader.batches_per_epoch >= 1:
        return
    n = getattr(train_ds, "num_samples", None) or len(train_ds)  # tar shards: the count from their index
    inner = train_ds.ds if isinstance(train_ds, _Head) else train_ds
    where = getattr(inner, "root", None) or cfg.data_dir or cfg.dataset
    fix = "raise --train-samples" if cfg.train_samples else "add training images"
    if cfg.train_samples:
        where += f" (--train-samples {cfg.train_samples})"
    sampler = train_loader.sampler
    world = getattr(sampler, "world_size", None) or getattr(train_ds, "world_size", 1)
    if world > 1:
        per = sampler.shard_size() if hasattr(sampler, "shard_size") else -(-n // world)
        what = f"the {per} training images per process ({n} in {where} over {world} processes)"
        fix += ", or run fewer processes"
    else:
        per, what = n, f"the {n} training images in {where}"
    raise ValueError(
        f"--batch-size {cfg.batch_size} is larger than {what}: lower --batch-size to at most {per}, "
        f"or {fix} (training drops the last partial batch, so an epoch would have no step)"
    )


def check_batch_aug(cfg: TrainConfig) -> None:
    """--batch-aug (on in the fashion-mnist preset) has flips, pad + crop and erasing only, on Fashion-MNIST's
    uint8 arrays: refuse what it cannot do, naming the flag that turns it off."""
    if not cfg.batch_aug:
        return
    bad = [
        *([f"--dataset {cfg.dataset}"] if not _is_fmnist(cfg.dataset) else []),
        *([f"--aa {cfg.aa}"] if cfg.aa else []),
        *(["--no-simple-aug"] if not cfg.simple_aug else []),
    ]
    if bad:
        raise ValueError(
            f"--batch-aug (set by --preset fashion-mnist) cannot do {' and '.join(bad)}: it works with "
            "--dataset fashion-mnist, --simple-aug and no --aa. Add --no-batch-aug to augment each image "
            "instead (slower), or leave out " + " and ".join(bad)
        )


def build_data(cfg: TrainConfig, distributed: bool, mixup_fn=None) -> DataBundle:
    """Datasets and loaders. ``batch_aug``: Fashion-MNIST as uint8 tensors augmented a whole batch at a time
    (pad + crop, flip, erasing; several times cheaper than per-image PIL transforms on a small CPU).
    ``mixup_fn`` runs in the training collate, inside the batch's seeded RNG stream."""
    from ..data import build_batch_transform, build_dataset, build_loader, build_transform, check_class_match

    dp = resolve_data_params(cfg)
    mode = "L" if dp["in_chans"] == 1 else "RGB"
    if cfg.batch_aug:
        check_batch_aug(cfg)
        bt = dict(input_size=dp["img_size"], mean=dp["mean"], std=dp["std"])
        train_tf, val_tf = None, None
        train_bt = build_batch_transform(
            True, padding=cfg.crop_padding, hflip=cfg.hflip, reprob=cfg.reprob, remode=cfg.remode, **bt
        )
        val_bt = build_batch_transform(False, **bt)
    else:
        common = dict(
            input_size=dp["img_size"],
            in_chans=dp["in_chans"],
            interpolation=dp["interpolation"],
            mean=dp["mean"],
            std=dp["std"],
            simple=cfg.simple_aug,
        )
        train_tf = build_transform(
            True,
            aa=cfg.aa,
            reprob=cfg.reprob,
            remode=cfg.remode,
            scale=tuple(cfg.scale),
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter,
            padding=cfg.crop_padding,
            **common,
        )
        val_tf = build_transform(False, crop_pct=dp["crop_pct"], **common)
        train_bt = val_bt = None
    extra = {"raw": True} if cfg.batch_aug else {}
    train_ds = build_dataset(
        cfg.dataset, cfg.data_dir, cfg.train_split, transform=train_tf, mode=mode, **extra
    )
    val_ds = build_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, transform=val_tf, mode=mode, **extra)
    check_class_match(train_ds, val_ds)  # before any step: label k must mean the same class in both
    classes = list(train_ds.classes)
    if cfg.train_samples:
        train_ds = _head(train_ds, cfg.train_samples, "--train-samples")
    if cfg.val_samples:
        val_ds = _head(val_ds, cfg.val_samples, "--val-samples")
    train_loader = build_loader(
        train_ds,
        cfg.batch_size,
        True,
        workers=cfg.workers,
        distributed=distributed,
        seed=cfg.seed,
        collate_mixup=mixup_fn,
        batch_transform=train_bt,
    )
    _check_batch_fits(cfg, train_ds, train_loader)
    val_loader = build_loader(
        val_ds,
        cfg.validation_batch_size or cfg.batch_size,
        False,
        workers=cfg.workers,
        distributed=distributed,
        seed=cfg.seed,
        batch_transform=val_bt,
    )
    # a private generator for the loaders' worker base seed: otherwise starting an epoch's iterator draws from
    # the global torch RNG, and a run resumed mid-epoch would draw at another point than an uninterrupted one
    for i, ld in enumerate((train_loader, val_loader)):
        ld.generator = torch.Generator().manual_seed(cfg.seed + i)
    return DataBundle(train_loader, val_loader, classes, dp)


def _arch_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    kw = dict(cfg.model_kwargs)
    if cfg.window_size:
        kw["window_size"] = cfg.window_size
    if cfg.drop:
        kw["drop_rate"] = cfg.drop
    return kw


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, verbose: bool = True) -> torch.nn.Module:
    """The model of the config; with ``initial_checkpoint`` its weights are loaded (any layout), the
    classifier left fresh when the class count differs. DaViT has no position tables, so weights fit any
    resolution and window size unchanged (fine-tuning at 384 or window 12 needs no interpolation).
    ``pretrained`` loads the released weights the same way (fresh classifier, stem adapted to in_chans)."""
    if cfg.pretrained and cfg.initial_checkpoint:
        raise ValueError(
            "--pretrained and --initial-checkpoint both name starting weights; give one of them "
            "(--initial-checkpoint takes a released checkpoint file too)"
        )
    drop_path = cfg.drop_path
    if drop_path is None:
        drop_path = DEFAULT_DROP_PATH.get(split_name(cfg.model)[0], 0.0)
    model = create_model(
        cfg.model,
        pretrained=cfg.pretrained,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_path_rate=drop_path,
        **_arch_kwargs(cfg),
    )
    if cfg.pretrained and verbose:
        print(f"initial weights: the released {cfg.model} weights", flush=True)
    if cfg.initial_checkpoint:
        from ..weights import check_weights, load_weights

        ignore_head = not check_weights(model, cfg.initial_checkpoint).ok
        report = load_weights(model, cfg.initial_checkpoint, strict=True, ignore_head=ignore_head)
        if verbose:
            head = " (new classifier: class count differs)" if ignore_head else ""
            print(f"initial weights from {cfg.initial_checkpoint}{head}:\n{report}", flush=True)
    return model


def weights_metadata(cfg: TrainConfig, classes: list[str], params: dict[str, Any], **extra: Any) -> dict:
    """Everything needed to rebuild and feed the model, stored in the .safetensors header."""
    return {
        "model": cfg.model,
        "arch": json.dumps(_arch_kwargs(cfg)),
        "num_classes": len(classes) if not cfg.num_classes else cfg.num_classes,
        "classes": json.dumps(classes),
        "in_chans": params["in_chans"],
        "img_size": params["img_size"],
        "mean": json.dumps(params["mean"]),
        "std": json.dumps(params["std"]),
        "crop_pct": params["crop_pct"],
        "interpolation": params["interpolation"],
        "simple_aug": cfg.simple_aug,
        "batch_aug": cfg.batch_aug,
        **extra,
    }


def trainer_checkpoint(path: str | Path) -> dict | None:
    """The contents of ``path`` if it is a training checkpoint of `davit train` (ckpt-*.pt, best.pt: a dict
    with the run's ``config`` and ``model``), else None (a weights file, or a file load_state_dict will
    explain). Read with ``torch.load(weights_only=True)``, memory-mapped: the optimizer state is not read."""
    p = Path(path)
    if p.suffix == ".safetensors" or not p.is_file():
        return None
    st = None
    for mmap in (True, False):  # mmap needs the zip format torch.save writes by default
        try:
            st = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:  # not a torch file, or a hostile pickle: load_state_dict reports it
            continue
    if isinstance(st, dict) and isinstance(st.get("config"), dict) and isinstance(st.get("model"), dict):
        return st
    return None


def _run_folder_classes(path: Path) -> list[str] | None:
    """Class names from the finished run's model.safetensors next to a training checkpoint, if any."""
    from ..weights import read_metadata

    for d in (path.parent, path.parent.parent):
        w = d / "model.safetensors"
        if w.is_file():
            classes = read_metadata(w).get("classes")
            if isinstance(classes, list):
                return classes
    return None


def trainer_checkpoint_metadata(path: str | Path, st: dict) -> dict[str, Any]:
    """What :func:`weights_metadata` would hold for the weights of a training checkpoint, rebuilt from the
    run config stored inside it (architecture, input channels, size, normalisation, eval crop), plus that
    config under ``config``. Class names: stored in the checkpoint (newer runs), else from the run's
    model.safetensors when the run finished, else left out."""
    from dataclasses import fields

    from .config import TrainConfig, apply_overrides

    names = {f.name for f in fields(TrainConfig)}
    # keys of another version of the trainer are left out rather than refused: the model is what matters
    cfg = apply_overrides(
        TrainConfig(), {k: v for k, v in st["config"].items() if k in names}, f"{path} (its run config)"
    )
    params = resolve_data_params(cfg)
    classes = st.get("classes") or _run_folder_classes(Path(path))
    meta = weights_metadata(cfg, list(classes or []), params)
    for k in ("arch", "classes", "mean", "std"):
        meta[k] = json.loads(meta[k])
    if not classes:
        del meta["classes"]
        if not cfg.num_classes:
            del meta["num_classes"]  # model_from_metadata reads it off the classifier's weights
    meta["config"] = cfg.to_dict()
    return meta


def model_from_metadata(
    path: str,
    model: str | None = None,
    use_ema: bool = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from its weights file (metadata from the trainer when present) or from a
    training checkpoint of `davit train` (model rebuilt from the run config inside it)."""
    from ..weights import load_state_dict, load_weights, read_metadata

    st = trainer_checkpoint(path)
    if st is not None:
        if use_ema and not st.get("model_ema"):
            raise ValueError(
                f"--use-ema: {path} holds no EMA weights (was the run trained with --model-ema?)"
            )
        meta = trainer_checkpoint_metadata(path, st)
        del st  # the mapped file is read again below, for the chosen weights only
    else:
        meta = read_metadata(path)
    name = model or meta.get("model")
    if not name:
        raise ValueError(f"{path} does not say which model it holds; pass --model (e.g. --model davit_tiny)")
    sd = load_state_dict(path, use_ema=use_ema)
    n_cls = num_classes or meta.get("num_classes")
    if n_cls is None:
        w = next((v for k, v in sd.items() if k.endswith("head.fc.weight") or k == "head.weight"), None)
        n_cls = w.shape[0] if w is not None else None
    arch = meta.get("arch") or {}
    if isinstance(arch, str):
        arch = json.loads(arch)
    net = create_model(name, num_classes=n_cls, in_chans=in_chans or meta.get("in_chans", 3), **arch)
    load_weights(net, sd, strict=True)
    info = model_info(name)
    meta.setdefault("img_size", info["input_size"][-1])
    meta.setdefault("crop_pct", info["crop_pct"])
    meta.setdefault("interpolation", info["interpolation"])
    meta.setdefault("mean", list(info["mean"]))
    meta.setdefault("std", list(info["std"]))
    meta.setdefault("in_chans", net.in_chans)
    meta["model"] = name
    return net, meta
