"""Training and evaluation loop of the dense tasks, read top to bottom: build, resume, iterate,
evaluate, report.

Reuses the classification trainer's pieces: atomic checksummed checkpoints and resume
(:mod:`davit.train.checkpoint`), progress bar and ``metrics.jsonl`` (:mod:`davit.train.logging`) and torchrun
set-up (:mod:`davit.train.distributed`). A run folder holds ``config.json``, ``ckpt/``, ``metrics.jsonl``,
``model.safetensors`` (final weights) and ``report.md``. Evaluation runs on rank 0.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from ..alloc import tune_malloc
from ..data.loader import BATCH_RNG, EpochSampler, SeededDataset
from ..train.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from ..train.distributed import all_reduce_mean, barrier, cleanup, init_distributed
from ..train.logging import MetricsLogger, Progress, memory_fields
from ..train.optim import fused_kwargs
from ..train.trainer import NonFiniteLossError, StopFlag
from .coco import CocoInstances, coco_evaluate, coco_results, collate_detection
from .config import TaskConfig, resolve_task_config
from .detection import detector_param_groups, maskrcnn
from .seg_data import SegFolder, SegMetric
from .segmentation import segment_inference, upernet

__all__ = ["build_model", "build_datasets", "train", "evaluate", "load_run", "lr_factor"]


# ----- building ---------------------------------------------------------------------------------------------
def _paths(cfg: TaskConfig, split: str) -> tuple[str, str]:
    img, ann = (cfg.train_images, cfg.train_ann) if split == "train" else (cfg.val_images, cfg.val_ann)
    if cfg.data is not None:
        root = Path(cfg.data)
        img = img or str(root / "images" / split)
        ann = ann or str(
            root
            / ("annotations" if cfg.task == "detect" else "labels")
            / (f"instances_{split}.json" if cfg.task == "detect" else split)
        )
    if img is None or ann is None:
        raise ValueError(
            f"no {split} data: pass --data DIR (scenes layout) or set {split}_images and {split}_ann"
        )
    return img, ann


def build_datasets(cfg: TaskConfig, splits: tuple[str, ...] = ("train", "val")) -> dict[str, Any]:
    out = {}
    for split in splits:
        img, ann = _paths(cfg, split)
        train = split == "train"
        if cfg.task == "detect":
            out[split] = CocoInstances(
                img,
                ann,
                train=train,
                flip_prob=cfg.flip_prob,
                crop_prob=cfg.crop_prob,
                crop_short_sides=cfg.crop_short_sides,
                crop_size_range=cfg.crop_size_range,
                max_size=cfg.max_size,
            )
        else:
            out[split] = SegFolder(
                img,
                ann,
                train=train,
                crop_size=cfg.crop_size,
                scale=cfg.scale,
                ratio_range=cfg.ratio_range,
                reduce_zero_label=cfg.reduce_zero_label,
                flip_prob=cfg.flip_prob,
                photometric=cfg.photometric,
                cache=cfg.cache_images,
                num_classes=cfg.num_classes,
            )
    return out


def build_model(cfg: TaskConfig, backbone_weights: bool = True) -> nn.Module:
    if cfg.num_classes is None:
        raise ValueError(
            "num_classes is not set (detect: max category id + 1; segment: number of label classes)"
        )
    weights = cfg.backbone_weights if backbone_weights else None
    if cfg.task == "detect":
        return maskrcnn(
            cfg.model,
            cfg.num_classes,
            weights,
            drop_path_rate=cfg.drop_path_rate,
            fpn_channels=cfg.fpn_channels,
            box_head_dim=cfg.box_head_dim,
            mask_head_channels=cfg.mask_head_channels,
            min_size=cfg.min_sizes,
            max_size=cfg.max_size,
            backbone_kwargs=cfg.backbone_kwargs,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_batch_size_per_image=cfg.box_batch_size_per_image,
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            box_detections_per_img=cfg.detections_per_img,
        )
    return upernet(
        cfg.model,
        cfg.num_classes,
        weights,
        drop_path_rate=cfg.drop_path_rate,
        channels=cfg.channels,
        aux_channels=cfg.aux_channels,
        aux_weight=cfg.aux_weight,
        backbone_kwargs=cfg.backbone_kwargs,
        dropout=cfg.dropout,
    )


def lr_factor(cfg: TaskConfig, it: int, progress: float) -> float:
    """Multiplier of the base lr at iteration ``it``: linear warmup (mmcv style, in iterations), then step or
    poly decay as a function of ``progress`` in [0, 1] (the fraction of the run done, see :func:`train`)."""
    if cfg.schedule == "step":
        length = cfg.epochs if cfg.task == "detect" else cfg.iters  # lr_steps are in the run's unit
        f = cfg.gamma ** sum(progress >= s / length for s in cfg.lr_steps)
    else:
        min_f = cfg.min_lr / cfg.lr
        f = (1 - min_f) * (1 - min(progress, 1.0)) ** cfg.poly_power + min_f
    if it < cfg.warmup_iters:
        f *= 1 - (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return f


class _EndBatchRNG:
    """The task's collate, then the end of the batch's seeded RNG stream (davit.data.loader.BATCH_RNG),
    which restores the main process's RNG states when there are no workers."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, batch: list) -> Any:
        try:
            return self.collate(batch)
        finally:
            BATCH_RNG.end()


def _batches(loader: DataLoader, sampler: EpochSampler, start: int) -> Iterator:
    """Batches without end from iteration ``start``: each epoch's order and augmentation seeds depend only on
    (seed, epoch), and a mid-epoch start skips without loading, so a resumed run sees exactly the batches the
    uninterrupted one saw (davit.data.loader)."""
    per_epoch = sampler.shard_size() // loader.batch_size
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch, skip=skip * loader.batch_size)
        yield from loader
        epoch, skip = epoch + 1, 0


# ----- evaluation -------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module, ds, cfg: TaskConfig, device: torch.device, progress: str = "none"
) -> dict[str, Any]:
    """Detection: pycocotools box/mask AP; segmentation: mIoU, per-class IoU, aAcc. Also inference img/s."""
    model.eval()
    # its own generator: a DataLoader without one draws its workers' base seed from the global RNG, so an
    # evaluation during training would change the dropout and sampling that follow it, and a run resumed
    # from a checkpoint saved without that evaluation (on a signal) would no longer end with the same weights
    kw = dict(shuffle=False, num_workers=cfg.workers, generator=torch.Generator().manual_seed(0))
    if cfg.task == "detect":
        loader = DataLoader(ds, cfg.eval_batch_size, collate_fn=collate_detection, **kw)
    else:
        loader = DataLoader(ds, cfg.eval_batch_size, **kw)
    results, metric, n, t_model = [], SegMetric(cfg.num_classes), 0, 0.0

    def done() -> float:  # GPU kernels run asynchronously: wait for them before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    with Progress(len(loader), "eval", progress) as bar:
        for images, targets in loader:
            t0 = time.perf_counter()
            if cfg.task == "detect":
                outs = model([im.to(device) for im in images])
                t_model += done() - t0
                results += coco_results(outs, [int(t["image_id"]) for t in targets])
            else:
                probs = segment_inference(
                    model,
                    images.to(device),
                    cfg.test_mode,
                    cfg.test_crop,
                    cfg.test_stride,
                    cfg.test_scales,
                    cfg.test_flip,
                    scale=cfg.scale if cfg.test_resize else None,
                )
                t_model += done() - t0
                metric.update(probs.argmax(1).cpu(), targets)
            n += len(images)
            bar.update(1)
    scores = coco_evaluate(ds.coco, results) if cfg.task == "detect" else metric.compute()
    scores["infer_img_per_s"] = n / max(t_model, 1e-9)
    return scores


# ----- training ---------------------------------------------------------------------------------------------
def train(
    cfg: TaskConfig, out_dir: str | Path, resume: bool = True, progress: str = "auto"
) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` (resuming from its newest valid checkpoint); returns final scores."""
    dist_info = init_distributed(cfg.device)
    device, main = dist_info.device, dist_info.is_main
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        from ..train.demo import pick_threads

        torch.set_num_threads(cfg.threads or pick_threads())
    if device.type == "cpu":  # before the loaders fork their workers (see davit.alloc)
        malloc_line = tune_malloc()
        if main:
            print(malloc_line, flush=True)
    out = Path(out_dir)
    torch.manual_seed(cfg.seed + dist_info.rank)
    data = build_datasets(cfg, ("train", "val") if main else ("train",))
    if cfg.task == "detect":
        if cfg.num_classes is None:
            cfg.num_classes = data["train"].num_classes
        for split, ds in data.items():
            if ds.num_classes > cfg.num_classes:  # a category id the box predictor has no output for
                raise ValueError(
                    f"the {split} annotations use category ids up to {ds.num_classes - 1}, but num_classes "
                    f"is {cfg.num_classes} (ids 1..{cfg.num_classes - 1}; 0 is the background): set "
                    f"num_classes={ds.num_classes}"
                )
    model = build_model(cfg).to(device)
    # the recipe's SyncBN; PyTorch implements it for GPUs only, so CPU ranks (gloo) normalise with their own
    # batch statistics (DDP broadcasts rank 0's running statistics)
    sync_bn = cfg.task == "segment" and dist_info.distributed and device.type == "cuda"
    if dist_info.distributed:
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Mask R-CNN: kept on deliberately. No unused parameter has been seen on the scenes, but its branches
        # depend on the batch (a rank whose images have no positive proposals), and an unused one would hang
        # or fail the run; the price is one autograd-graph walk per iteration (not measured on a GPU)
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=cfg.task == "detect")
    core = model.module if dist_info.distributed else model

    rank, world = dist_info.rank, dist_info.world_size
    if cfg.batch_size < world or cfg.batch_size % world:
        raise ValueError(
            f"batch_size {cfg.batch_size} is global and must split evenly over the {world} processes: use a "
            f"multiple of {world}"
        )
    per_rank = cfg.batch_size // world
    if cfg.task == "segment" and per_rank < 2 and not sync_bn:
        # the heads' BatchNorm (after the 1x1 pyramid pooling) needs 2 values per channel; on GPUs SyncBN
        # pools the batch over the ranks, on CPU each process normalises alone
        raise ValueError(
            f"batch_size {cfg.batch_size} leaves {per_rank} image per process, and the segmentation heads' "
            f"BatchNorm needs at least 2 (SyncBN, which pools them over processes, is GPU-only): set "
            f"batch_size to at least {2 * world}"
        )
    train_ds = data["train"]
    sampler = EpochSampler(len(train_ds), seed=cfg.seed, rank=rank, world_size=world, batch_size=per_rank)
    iters_per_epoch = sampler.shard_size() // per_rank
    if iters_per_epoch == 0:
        raise ValueError(
            f"the training set has {len(train_ds)} images, fewer than one batch of {per_rank} per process "
            f"({world} process(es)): lower batch_size to at most "
            f"{max(1, sampler.shard_size())}"
        )
    loader = DataLoader(
        SeededDataset(train_ds),  # per-batch augmentation seeds from (seed, epoch, batch)
        per_rank,
        sampler=sampler,
        num_workers=cfg.workers,
        drop_last=True,
        collate_fn=_EndBatchRNG(collate_detection if cfg.task == "detect" else default_collate),
        persistent_workers=cfg.workers > 0,
        # its own generator for the workers' base seed, so creating an iterator (each epoch, or on a
        # resume) does not draw from the global RNG the model's dropout and samplers use
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    total = math.ceil(cfg.epochs * iters_per_epoch) if cfg.task == "detect" else int(cfg.iters)

    optimizer = torch.optim.AdamW(
        detector_param_groups(core, cfg.weight_decay, cfg.decay_1d_params),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        **fused_kwargs(core.parameters()),
    )
    t_start = time.time()

    def progress(it: int) -> float:
        # iterations done; with a time limit, the elapsed share of it when larger, so that a run cut short by
        # a slow or busy machine still goes through its whole schedule (the CPU demos' fixed time budget)
        p = it / total
        if cfg.time_limit_min:
            p = max(p, (time.time() - t_start) / (60 * cfg.time_limit_min))
        return p

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it, progress(it)))
    ckpts = CheckpointManager(out / "ckpt", cfg.keep_checkpoints)
    step, best = 0, None
    latest = ckpts.latest() if resume else None
    if latest is None and main:
        moved = ckpts.set_aside()  # an earlier run's checkpoints would outlive this run's (see set_aside)
        if moved is not None:
            print(f"starting over: moved the checkpoints of an earlier run in {out} to {moved}", flush=True)
    if latest is not None:
        st = load_checkpoint(latest)
        core.load_state_dict(st["model"])
        try:
            optimizer.load_state_dict(st["optimizer"])
        except ValueError as e:  # e.g. "a different number of parameter groups"
            raise ValueError(
                f"the optimizer state in {latest} does not fit this config's parameter groups ({e}): a run "
                "started with decay_1d_params=false (two groups; every run before the key existed) resumes "
                "with --set decay_1d_params=false"
            ) from e
        sched.load_state_dict(st["scheduler"])
        step, best = int(st["step"]), st.get("best")
        set_rng_state(st["rng"])
        if main:
            print(f"resumed from {latest} at iteration {step}/{total}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    logger = MetricsLogger(out, truncate_after_step=step) if main else None
    key = "box_AP" if cfg.task == "detect" else "mIoU"

    def save(scores: dict[str, Any] | None) -> None:
        nonlocal best
        is_best = scores is not None and (best is None or scores[key] > best)
        if is_best:
            best = scores[key]
        ckpts.save(
            dict(
                model=core.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=sched.state_dict(),
                step=step,
                best=best,
                rng=rng_state(),
                config=cfg.to_dict(),
            ),
            step,
            is_best,
        )

    seen, stopped_early, signalled = 0, False, False
    batches = _batches(loader, sampler, step)  # a resumed run continues the same batches
    model.train()
    resume_hint = "run the same command again (same --out) to resume"
    with StopFlag(ckpts.folder, resume_hint) as stop, Progress(
        total - step, f"{cfg.task} train", progress if main else "none", every=cfg.log_interval
    ) as bar:
        while step < total:
            images, targets = next(batches)
            if cfg.task == "detect":
                images = [im.to(device) for im in images]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                    losses = model(images, targets)
                losses["loss"] = sum(losses.values())
            else:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                    losses = model(images.to(device), targets.to(device))  # through forward: DDP syncs
            # one small all-reduce: the losses averaged over ranks (what is logged and checked), and whether
            # any rank was signalled, so that every rank takes the same decision at the same iteration
            names = list(losses)  # the same keys in the same order on every rank
            vals = torch.stack([losses[k].detach().float() for k in names]).double().cpu()  # one sync
            signalled_here = torch.tensor([float(stop.signal is not None)], dtype=torch.float64)
            flags = all_reduce_mean(torch.cat([signalled_here, vals]))
            reduced = dict(zip(names, flags[1:].tolist()))
            if not math.isfinite(reduced["loss"]):
                latest_ok = ckpts.latest()
                raise NonFiniteLossError(
                    f"loss is {reduced['loss']} at iteration {step + 1}; the step was not applied. Last good "
                    f"checkpoint: {latest_ok or 'none yet'}. Lower lr or set grad_clip, then run again with "
                    "the same --out to resume from it."
                )
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip)
            optimizer.step()
            sched.step()
            step += 1
            seen += len(images) * dist_info.world_size
            fields = {k: round(v, 4) for k, v in reduced.items()}
            bar.update(1, loss=fields["loss"], lr=optimizer.param_groups[0]["lr"])
            if logger and (step % cfg.log_interval == 0 or step == total):
                logger.log(
                    "train",
                    step,
                    lr=optimizer.param_groups[0]["lr"],
                    img_per_s=round(seen / (time.time() - t_start), 2),
                    **fields,
                    **memory_fields(device),
                )
            if flags[0].item() > 0:  # SIGTERM/SIGINT: keep this iteration, then exit
                save(None) if main else None
                barrier()
                signalled = True
                break
            over_time = cfg.time_limit_min is not None and time.time() - t_start > 60 * cfg.time_limit_min
            if (cfg.eval_interval and step % cfg.eval_interval == 0 and step < total) and not over_time:
                scores = evaluate(core, data["val"], cfg, device) if main else None
                if logger:
                    logger.log("val", step, **_scalars(scores))
                save(scores) if main else None
                barrier()
                model.train()
            if over_time:
                stopped_early = True
                break
    if signalled:
        if main:
            print(
                f"stopped at iteration {step}/{total} ({_signal_name(stop.signal)}), checkpoint saved; "
                f"run the same command again (same --out) to resume",
                flush=True,
            )
            logger.close()
        cleanup()
        torch.set_num_threads(threads_before)
        return {"stopped": True, "step": step}
    train_s = time.time() - t_start
    scores = None
    if main:
        scores = evaluate(core, data["val"], cfg, device, progress)
        logger.log("val", step, **_scalars(scores))
        save(scores)
        from ..weights import save_weights

        save_weights(
            core, out / "model.safetensors", metadata=dict(task=cfg.task, config=json.dumps(cfg.to_dict()))
        )
        _write_report(out, cfg, scores, step, total, train_s, seen, stopped_early, data["val"])
        logger.close()
    barrier()
    cleanup()
    torch.set_num_threads(threads_before)  # callers in the same process (tests, notebooks) keep theirs
    return scores or {}


def _signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "a signal on another rank"


def _scalars(scores: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (round(v, 5) if isinstance(v, float) else v) for k, v in scores.items() if not isinstance(v, list)
    }


def _write_report(
    out: Path,
    cfg: TaskConfig,
    scores: dict[str, Any],
    step: int,
    total: int,
    train_s: float,
    seen: int,
    stopped_early: bool,
    val_ds,
) -> None:
    from .coco import format_metric

    lines = [
        f"# davit {cfg.task}: {cfg.model} on {cfg.data or cfg.train_images}",
        "",
        f"- iterations: {step} of {total}" + (" (stopped early at the time limit)" if stopped_early else ""),
        f"- training time: {train_s / 60:.1f} min, {seen / max(train_s, 1e-9):.2f} img/s",
        f"- validation images: {len(val_ds)}",
        f"- inference: {scores['infer_img_per_s']:.2f} img/s (eval batch {cfg.eval_batch_size})",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [
        f"| {k} | {format_metric(v)} |"
        for k, v in scores.items()
        if isinstance(v, float) and k != "infer_img_per_s"
    ]
    if cfg.task == "segment":
        names = _class_names(cfg)
        lines += ["", "| class | IoU |", "|---|---|"]
        lines += [f"| {names[i] if i < len(names) else i} | {v:.4f} |" for i, v in enumerate(scores["IoU"])]
    lines += ["", "Config: `config.json`; per-iteration log: `metrics.jsonl`; weights: `model.safetensors`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _class_names(cfg: TaskConfig) -> list[str]:
    meta = Path(cfg.data) / "meta.json" if cfg.data else None
    if meta is not None and meta.is_file():
        return json.loads(meta.read_text()).get("semantic_classes", [])
    return []


def load_run(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    overrides: dict[str, Any] | None = None,
    task: str | None = None,
) -> tuple[nn.Module, TaskConfig]:
    """The trained model of a run folder (``config.json`` + ``model.safetensors``), in eval mode.

    ``overrides`` (``--set`` of eval/predict: test-time settings, and model options such as
    ``detections_per_img`` or ``min_sizes``) apply before the model is built, with the same checks as
    training; ``task``, when given, must be the run's (a detection run cannot be evaluated as segmentation).
    """
    run = Path(run_dir)
    for f in ("config.json", "model.safetensors"):
        if not (run / f).is_file():
            raise FileNotFoundError(
                f"{run / f} not found: pass the folder a `davit detect|segment train` wrote"
            )
    raw = json.loads((run / "config.json").read_text())
    if task is not None and raw.get("task") != task:
        raise ValueError(
            f"{run} holds a `davit {raw.get('task')}` run, not a {task} one: use "
            f"`davit {raw.get('task')} eval|predict` on it"
        )
    # run folders written before `test_resize` existed meant test_scales as ratios of the image size
    raw.setdefault("test_resize", False)
    cfg = resolve_task_config(raw["task"], None, None, {**raw, **(overrides or {})})
    model = build_model(cfg, backbone_weights=False)
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(run / "model.safetensors")))
    except RuntimeError as e:
        changed = sorted(overrides or {})
        # torch's message: a header line, then one line per mismatching or missing tensor; name the first
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise ValueError(
            f"the weights in {run / 'model.safetensors'} do not fit the model built from its config"
            + (f" with the overrides {changed}" if changed else "")
            + f": {' '.join(lines[:2])}{more}; override test-time options only, not the architecture"
        ) from e
    return model.to(device).eval(), cfg
