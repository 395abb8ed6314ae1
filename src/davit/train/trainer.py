"""The training run, top to bottom: set-up, resume, the epoch loop (accumulate, clip, step, EMA, schedule),
evaluation, checkpoints, and the final weights and report. Single process, torchrun DDP, or FSDP2."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..alloc import tune_malloc
from ..data.loader import format_bad
from .checkpoint import CheckpointManager, load_checkpoint, rng_state, set_aside_files, set_rng_state
from .config import TrainConfig, check_ranges, finalize, save_config
from .distributed import (
    all_gather_objects,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
)
from .logging import MetricsLogger, Progress, memory_fields
from .metrics import autocast, evaluate
from .optim import ReplannedSchedule, build_optimizer, build_scheduler
from .setup import build_data, build_model, check_batch_aug, weights_metadata

__all__ = ["train", "NonFiniteLossError"]


# what a run writes at the top of its folder; a fresh start in a used folder moves an earlier run's aside
RUN_FILES = (
    "checkpoints",
    "config.yaml",
    "metrics.jsonl",
    "tb",
    "report.md",
    "curves.png",
    "confusion.png",
    "model.safetensors",
    "model_ema.safetensors",
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without applying that step."""


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits.

    An error raised inside the block after the signal arrived is the signal's doing, not a bug: it reaches the
    whole process group, so helper processes die mid-step with it (torch.compile's C++ compiler during a first
    compiled step, which takes minutes on a CPU; data-loader workers) and the step fails with their error,
    e.g. a ``CppCompileError`` whose text is a thousand lines of compiler output. On leaving the block that
    error becomes a few lines naming the signal, where the checkpoints saved before the step are
    (``ckpt_dir``) and how to resume (``resume_hint``)."""

    def __init__(self, ckpt_dir: Path | None = None, resume_hint: str = "") -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}
        self.ckpt_dir, self.resume_hint = ckpt_dir, resume_hint

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread): no handlers
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum
        print(
            f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step",
            flush=True,
        )

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        if self.signal is None or not isinstance(exc, Exception) or isinstance(exc, NonFiniteLossError):
            return  # no signal, no error, or one that is not the signal's (KeyboardInterrupt passes too)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(
            f"stopped by {signal.Signals(self.signal).name} in the middle of a step, which then failed with "
            f"{type(exc).__name__} ({first}): the signal reaches the whole process group, so it most likely "
            f"stopped a helper process of the step (torch.compile's compiler, data-loader workers). "
            f"Checkpoints saved before it are kept in {self.ckpt_dir}; {self.resume_hint}"
        ) from exc


def _run_dir(cfg: TrainConfig, is_main: bool) -> Path:
    out = Path(cfg.output)
    name = cfg.experiment
    if name is None and cfg.resume == "auto" and out.is_dir():
        runs = [d for d in out.iterdir() if (d / "checkpoints").is_dir()]
        if runs:  # resume the most recent run of this output folder
            name = max(runs, key=lambda d: d.stat().st_mtime).name
    if name is None:
        name = stem = f"{cfg.model}-{cfg.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while (out / name).exists():  # a new run started within the same second as another
            name, n = f"{stem}-{n}", n + 1
    name = broadcast_object(name)
    d = out / name
    if is_main:
        d.mkdir(parents=True, exist_ok=True)
    return d


def _state_dicts(net: nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    if fsdp:  # gather the full, unsharded tensors on every rank (collective), offloaded to CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return net.state_dict(), opt.state_dict()


def _load_state_dicts(net: nn.Module, opt: torch.optim.Optimizer, msd: dict, osd: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            net,
            opt,
            model_state_dict=msd,
            optim_state_dict=osd,
            options=StateDictOptions(full_state_dict=True),
        )
        return
    net.load_state_dict(msd)
    opt.load_state_dict(osd)


def compile_options(device: torch.device) -> dict[str, Any]:
    """``torch.compile`` arguments for training on ``device``.

    On CPU inductor's layout optimisation (on by default in graphs with convolutions) copies every position
    encoding's input, already channels-last, into a channels-last buffer and stores the residual stream and
    saved activations in a (B, W, C, H) order that the next kernels transpose back; without it davit_tiny's
    compiled training step at batch 8 took 1899 instead of 2199 ms (medians of 8 alternating pairs of fresh
    processes, 7 in its favour, Zen 4 VM, docs/benchmarks.md, session 22). In fp32 the model's convolutions
    are opaque ops in compiled CPU code (``davit.layers.fused.conv``), which keeps the optimisation off in
    any user's ``torch.compile`` too; the option still covers bf16 autocast, where they are plain
    convolutions. GPUs keep the default. Both get the pass that keys inductor's caches on davit's operator
    code (:mod:`davit.compile_cache`: a cached backward of older code is not reused)."""
    from ..compile_cache import compile_options as code_keyed

    return {"options": code_keyed({"layout_optimization": False} if device.type == "cpu" else {})}


def _wrap_fsdp(net: nn.Module, device: torch.device) -> None:
    from torch.distributed.fsdp import fully_shard

    for stage in net.stages:
        for block in stage.blocks:
            fully_shard(block)
    fully_shard(net)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the training of ``cfg``; returns the final metrics (and the run folder as ``run_dir``)."""
    di = init_distributed(cfg.device)
    try:
        result = _train(cfg, di)
        # the ranks leave together: rank 0 may still be writing the final files, and a peer tearing gloo down
        # under it aborted once at exit (SIGABRT from a gloo thread, as pytorch/pytorch#179291 describes)
        barrier()
        return result
    finally:
        cleanup()


def _train(cfg: TrainConfig, di) -> dict[str, Any]:
    cfg = finalize(cfg)
    dev, main = di.device, di.is_main
    if cfg.amp and cfg.amp_dtype == "float16" and dev.type != "cuda":
        raise ValueError("--amp-dtype float16 needs a GPU (it uses a grad scaler); use bfloat16 on CPU")
    if cfg.amp_dtype not in ("bfloat16", "float16"):
        raise ValueError(f"--amp-dtype must be bfloat16 or float16, got {cfg.amp_dtype!r}")
    if cfg.fsdp and not di.distributed:
        raise ValueError("--fsdp shards over several processes: launch with torchrun --nproc-per-node=N")
    if cfg.fsdp and cfg.model_ema:
        raise ValueError("--model-ema is not supported with --fsdp (the EMA copy would not be sharded)")
    check_ranges(cfg)  # again: a TrainConfig built in code skips resolve_config
    t_start = time.time()
    check_batch_aug(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # before the loaders fork their workers; on CPU the steps' activations come from malloc (see davit.alloc)
    malloc_line = tune_malloc() if dev.type == "cpu" else ""

    from ..data import build_mixup

    # the class count must be known before the data (mixup targets): explicit, else from the dataset itself
    num_classes = cfg.num_classes or _dataset_classes(cfg)
    mixup_fn, train_loss_fn = build_mixup(
        cfg.mixup, cfg.cutmix, cfg.smoothing, num_classes, cfg.mixup_prob, cfg.mixup_switch_prob
    )
    data = build_data(cfg, di.distributed, mixup_fn)
    # batches with no readable image come as (None, None): the loop below leaves them out on all ranks at once
    data.train_loader.yield_empty = True
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    net = build_model(cfg, num_classes, data.params["in_chans"], verbose=main)
    if cfg.grad_checkpointing:
        net.set_grad_checkpointing(True)
    net.to(dev)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(net, decay=cfg.model_ema_decay)
    if cfg.fsdp:
        _wrap_fsdp(net, dev)
    accum = cfg.grad_accum_steps
    global_batch = cfg.batch_size * di.world_size * accum
    lr = cfg.lr * global_batch / cfg.lr_base_size if cfg.lr_base_size else cfg.lr
    opt = build_optimizer(
        net, cfg.opt, lr, cfg.weight_decay, cfg.opt_eps, tuple(cfg.opt_betas), cfg.layer_decay
    )
    batches = data.train_loader.batches_per_epoch  # >= 1: build_data refuses a batch larger than the data
    steps_per_epoch = batches // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"--grad-accum-steps {accum} is more than the {batches} batches of --batch-size {cfg.batch_size} "
            f"in an epoch: lower --grad-accum-steps to at most {batches}, or lower --batch-size"
        )
    # the run folder is made once the data, model and optimizer are built: a mistake found on the way leaves
    # no empty run folder behind
    run_dir = _run_dir(cfg, main)
    ckpts = CheckpointManager(run_dir / "checkpoints", cfg.keep_last)
    resume_path = (ckpts.latest() if cfg.resume == "auto" else Path(cfg.resume)) if cfg.resume else None
    st = load_checkpoint(resume_path) if resume_path is not None else None
    deadline = None  # wall-clock time by which a budgeted run stops training steps, whatever its plan
    budget_end = None  # ... and by which its last evaluation has ended (what re-plans fill)
    if cfg.time_budget:
        if st is not None:  # a resumed budget run keeps the schedule chosen (and re-planned) before
            cfg = dataclasses.replace(
                cfg,
                epochs=st["config"]["epochs"],
                max_epoch_steps=st["config"].get("max_epoch_steps"),
                replans=st["config"].get("replans", []),
            )
        else:
            epochs, cap, deadline = _epochs_for_budget(
                cfg, net, data, train_loss_fn, dev, t_start, steps_per_epoch, main
            )
            # each rank timed its own steps: all follow rank 0's plan and deadline, or their loops differ
            epochs, cap, time_left = broadcast_object((epochs, cap, deadline - time.time()))
            deadline = time.time() + time_left
            budget_end = t_start + cfg.time_budget - _REPORT_S
            cfg = dataclasses.replace(cfg, epochs=epochs, max_epoch_steps=cap, replans=[])
    full_epoch = steps_per_epoch  # the loader's whole epoch, in optimizer steps
    steps_per_epoch = epoch_steps(cfg, 0, full_epoch)
    sched = ReplannedSchedule(
        build_scheduler(
            opt, cfg.sched, cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr
        ),
        [(r[1], _replan_steps(cfg, r, full_epoch)) for r in cfg.replans],
    )
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and cfg.amp_dtype == "float16" else None
    model: nn.Module = net
    if di.distributed and not cfg.fsdp:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    if cfg.torchcompile:
        model = torch.compile(model, **compile_options(dev))
    # ----- resume -------------------------------------------------------------------------------------------
    start_epoch, start_pos, step, best = 0, 0, 0, -1.0
    start_batch: int | None = None
    if cfg.resume == "auto" and resume_path is None and main:
        print(f"--resume auto: no valid checkpoint in {ckpts.folder}, starting from scratch", flush=True)
    if st is None and main:
        # an earlier run's checkpoints would outlive this run's in the pruning (CheckpointManager.set_aside),
        # and its record, appended to, would tell two runs as one (report.md showed two "epoch 1" rows): all
        # of it goes into one replaced-<time>/ folder (checkpoints are written into a new checkpoints/)
        earlier = [run_dir / n for n in RUN_FILES if (run_dir / n).exists()]
        moved = set_aside_files(run_dir, earlier)
        if moved is not None:
            names = ", ".join(f.name for f in earlier)
            print(f"starting over: moved the files of an earlier run here ({names}) to {moved}", flush=True)
    if st is not None:
        _load_state_dicts(net, opt, st["model"], st["optimizer"], cfg.fsdp)
        if ema is not None and "model_ema" in st:
            ema.module.load_state_dict(st["model_ema"])
        if scaler is not None and "scaler" in st:
            scaler.load_state_dict(st["scaler"])
        start_epoch, start_pos, step, best = st["epoch"], st["position"], st["step"], st.get("best", -1.0)
        start_batch = st.get("batch_position")  # absent in checkpoints written before it existed
        set_rng_state(st["rng"][min(di.rank, len(st["rng"]) - 1)])
        if main:
            print(f"resumed from {resume_path}: epoch {start_epoch}, step {step}", flush=True)
    else:
        torch.manual_seed(cfg.seed + di.rank)  # drop path differs per rank, as with independent samples
    sched.step_update(step)

    logger = (
        MetricsLogger(run_dir, cfg.tensorboard, truncate_after_step=step if resume_path else None)
        if main
        else None
    )
    def write_config() -> None:
        save_config(
            # the epochs it chose (and re-planned) are in; repeating needs no probe
            dataclasses.replace(cfg, time_budget=None),
            run_dir / "config.yaml",
            {
                "world_size": di.world_size,
                "global_batch": global_batch,
                "time_budget": cfg.time_budget,
                "lr": lr,
                "num_classes": num_classes,
                "steps_per_epoch": steps_per_epoch,
                **data.params,
            },
        )

    if main:
        write_config()
        print(
            f"run folder: {run_dir}\n{cfg.model}: {sum(p.numel() for p in net.parameters()):,} params, "
            f"{len(data.train_loader.dataset)} train / {len(data.val_loader.dataset)} val images, "
            f"global batch {global_batch}, lr {lr:.3g}, {total_epochs(cfg)} epochs x {steps_per_epoch} "
            f"steps, device {dev}, world size {di.world_size}" + (f"\n{malloc_line}" if malloc_line else ""),
            flush=True,
        )

    def save(epoch: int, position: int, is_best: bool = False, batches: int | None = None) -> None:
        """``position``: optimizer steps done in ``epoch``; ``batches``: the loader's batches consumed in it
        (more than position x accum once a batch with no readable image was left out), where a resume
        continues; None: position x accum."""
        msd, osd = _state_dicts(net, opt, cfg.fsdp)  # collective under FSDP: every rank calls it
        rngs = [None] * di.world_size
        if di.distributed:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if not main:
            return
        st = {
            "model": msd,
            "optimizer": osd,
            "epoch": epoch,
            "position": position,
            "batch_position": position * accum if batches is None else batches,
            "step": step,
            "best": best,
            "rng": rngs,
            "config": cfg.to_dict(),
            "classes": data.classes,  # with the config: `davit eval`/`predict` rebuild the model from it
        }
        if ema is not None:
            st["model_ema"] = ema.module.state_dict()
        if scaler is not None:
            st["scaler"] = scaler.state_dict()
        ckpts.save(st, step, is_best)

    history: list[dict[str, Any]] = []
    result: dict[str, Any] = {"run_dir": str(run_dir)}
    stopped = out_of_time = False
    resume_hint = f"resume with --resume auto --experiment {run_dir.name} --output {cfg.output}"
    with StopFlag(ckpts.folder, resume_hint) as stop:
        for epoch in itertools.count(start_epoch):
            if epoch >= total_epochs(cfg):  # re-plans at epoch ends may change it
                break
            steps_per_epoch = epoch_steps(cfg, epoch, full_epoch)
            pos = start_pos if epoch == start_epoch else 0
            first = start_batch if epoch == start_epoch and start_batch is not None else pos * accum
            data.train_loader.set_epoch(epoch, start_iter=first)
            model.train()
            t0, seen, loss_sum, n_loss = time.time(), 0, 0.0, 0
            micro = 0
            left = steps_per_epoch - pos
            prog = Progress(
                left,
                f"epoch {epoch + 1}/{total_epochs(cfg)}",
                cfg.progress if main else "none",
                cfg.print_interval,
            )
            # resumed at the end of an epoch the loop below runs no step: the epoch record still needs the lr
            cur_lr = opt.param_groups[0]["lr"] / opt.param_groups[0].get("lr_scale", 1.0)
            with prog:
                for x, y in data.train_loader:
                    if pos >= steps_per_epoch:
                        break
                    # a batch whose images were all unreadable is left out by every rank together: a rank
                    # that left it out alone would run one step fewer and the others would wait for it
                    # forever in the gradient all-reduce (one more tiny all-reduce per batch under DDP)
                    if di.distributed:
                        if all_reduce_sum(torch.tensor([float(x is None)])).item() > 0:
                            continue
                    elif x is None:
                        continue
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    micro += 1
                    last_micro = micro % accum == 0
                    sync = (
                        contextlib.nullcontext()
                        if last_micro or not hasattr(model, "no_sync")
                        else model.no_sync()
                    )
                    with sync:
                        with autocast(dev, cfg.amp, cfg.amp_dtype):
                            loss = train_loss_fn(model(x), y)
                        # one small all-reduce: the mean loss over ranks, whether any rank was signalled and
                        # whether any is past the budget's deadline, so every rank takes the same decision
                        # (stop, NaN, out of time) at the same step
                        late = deadline is not None and time.time() > deadline
                        flags = all_reduce_mean(
                            torch.tensor(
                                [loss.item(), float(stop.signal is not None), float(late)],
                                dtype=torch.float64,
                            )
                        )
                        if not math.isfinite(flags[0].item()):
                            _nonfinite(flags[0].item(), epoch, step, ckpts)
                        (scaler.scale(loss / accum) if scaler else loss / accum).backward()
                    seen += len(x) * di.world_size
                    if not last_micro:
                        continue
                    if scaler is not None:
                        scaler.unscale_(opt)
                    if cfg.clip_grad:
                        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    pos += 1
                    if ema is not None:
                        ema.update(net, step=step)
                    sched.step_update(step)
                    step_loss = flags[0].item()
                    loss_sum, n_loss = loss_sum + step_loss, n_loss + 1
                    cur_lr = opt.param_groups[0]["lr"] / opt.param_groups[0].get("lr_scale", 1.0)
                    img_per_s = seen / max(1e-9, time.time() - t0)  # this epoch so far
                    if logger and step % max(1, cfg.log_interval) == 0:
                        logger.log(
                            "train",
                            step,
                            epoch=epoch,
                            loss=step_loss,
                            lr=cur_lr,
                            img_per_s=round(img_per_s, 1),
                            **memory_fields(dev),
                        )
                    prog.update(
                        1,
                        loss=loss_sum / n_loss,
                        lr=cur_lr,
                        **{"img/s": round(img_per_s)},
                    )
                    want_stop = flags[1].item() > 0 or (cfg.max_steps is not None and step >= cfg.max_steps)
                    # the epoch's last step is saved after the evaluation below, as the same file: not
                    # here too (one write less, and no rewrite of a committed checkpoint)
                    interval = (
                        cfg.checkpoint_every_steps
                        and step % cfg.checkpoint_every_steps == 0
                        and pos < steps_per_epoch
                    )
                    if want_stop or interval:
                        save(epoch, pos, batches=data.train_loader.position)
                    if want_stop:
                        stopped = True
                        break
                    if flags[2].item() > 0:
                        # the machine ran slower than the plan measured (a shared VM's speed swings by 20%
                        # within minutes): end the training here, still evaluate and save, and keep the
                        # promise of the budget rather than the step count
                        out_of_time = True
                        break
            if stopped:
                if main:
                    why = f"signal {stop.signal}" if stop.signal else f"--max-steps {cfg.max_steps}"
                    print(f"stopped at step {step} ({why}); {resume_hint}", flush=True)
                break
            # the unreadable files of every rank, not rank 0's alone (a collective: all ranks call it)
            bad_list = [b for part in all_gather_objects(list(data.train_loader.bad)) for b in part]
            bad, n_bad = format_bad(bad_list), len(bad_list)
            train_time = time.time() - t0
            # lockstep under FSDP: every forward all-gathers parameters, so ranks with fewer val batches
            # (uneven split, unreadable images left out) must keep stepping with the others
            t_eval = time.time()
            ev = evaluate(
                net,
                data.val_loader,
                dev,
                num_classes,
                cfg.amp,
                cfg.amp_dtype,
                cfg.channels_last,
                lockstep=cfg.fsdp,
            )
            rec = {
                "epoch": epoch,
                "train_loss": loss_sum / max(1, n_loss),
                "val_loss": ev["loss"],
                "top1": ev["top1"],
                "top5": ev["top5"],
                "lr": cur_lr,
                "epoch_time": train_time,
                "img_per_s": seen / max(1e-9, train_time),
                "skipped_files": n_bad,
                "val_skipped_files": ev["skipped_files"],
                "val_count": ev["count"],  # images scored, all ranks
                **memory_fields(dev),
            }
            if ema is not None:
                ev_ema = evaluate(
                    ema.module, data.val_loader, dev, num_classes, cfg.amp, cfg.amp_dtype, cfg.channels_last
                )
                rec.update(ema_top1=ev_ema["top1"], ema_top5=ev_ema["top5"], ema_val_loss=ev_ema["loss"])
            t_eval = time.time() - t_eval  # both evaluations: what each later epoch will spend too
            is_best = ev["top1"] > best
            best = max(best, ev["top1"])
            history.append(rec)
            result.update(rec, per_class_acc=ev["per_class_acc"], confusion=ev["confusion"], best_top1=best)
            if logger:
                logger.log("epoch", step, **rec)
                msg = (
                    f"epoch {epoch + 1}/{total_epochs(cfg)}: train loss {rec['train_loss']:.4f}  val loss "
                    f"{ev['loss']:.4f}  top1 {ev['top1']:.2f}  top5 {ev['top5']:.2f}"
                )
                if ema is not None:
                    msg += f"  ema top1 {rec['ema_top1']:.2f}"
                print(msg + f"  ({train_time:.0f}s, {rec['img_per_s']:.0f} img/s)", flush=True)
                if bad:
                    print(f"epoch {epoch + 1}: {bad}", flush=True)
                if ev["skipped"]:
                    print(f"epoch {epoch + 1}: validation: {format_bad(ev['skipped'])}", flush=True)
            # (not with cooldown epochs: the plan does not cover them)
            replan = budget_end is not None and not cfg.cooldown_epochs and not out_of_time
            if replan and epoch + 1 < total_epochs(cfg):
                # the plan came from a few timed steps at the start; the epoch just run measured the real
                # speed (a VM's swings by 20-40% over minutes, warm-up): fill what is left of the budget
                # with it, so that the run neither stops early with its lr schedule cut short nor leaves
                # time unused (every rank follows rank 0's decision)
                run = pos - (start_pos if epoch == start_epoch else 0)
                old_left = (total_epochs(cfg) - epoch - 1) * epoch_steps(cfg, epoch + 1, full_epoch)
                new = None
                if main:
                    new = _replan(epoch, step, old_left, run, train_time, t_eval, budget_end, full_epoch)
                new = broadcast_object(new)
                if new is not None:
                    cfg = dataclasses.replace(cfg, replans=[*cfg.replans, new])
                    steps_left = _replan_steps(cfg, new, full_epoch)
                    sched.replan(step, steps_left)
                    if main:
                        write_config()
                        print(
                            f"re-planned from this epoch's speed ({train_time / max(1, run):.3f}s/step): "
                            f"{steps_left} steps left in {new[2] - new[0]} epoch(s) (was {old_left})",
                            flush=True,
                        )
            save(epoch + 1, 0, is_best)
            if out_of_time:
                if main:
                    print(
                        f"time budget reached: training ended at step {step} of the planned "
                        f"{planned_steps(cfg, full_epoch)} (the machine ran slower than planned)",
                        flush=True,
                    )
                break
        barrier()
    final_sd = _state_dicts(net, opt, cfg.fsdp)[0]  # collective under FSDP: gathered on every rank
    if main:
        _finish(cfg, run_dir, final_sd, ema, data, result, stopped, logger)
    result["stopped"] = stopped
    result["step"] = step
    return result


def epoch_steps(cfg: TrainConfig, epoch: int, full: int) -> int:
    """Optimizer steps of ``epoch``: ``full`` (the loader's epoch), capped by ``max_epoch_steps`` or the
    latest re-plan that reached it."""
    cap = cfg.max_epoch_steps
    for first, _step, _epochs, c in cfg.replans:
        if epoch >= first:
            cap = c or None
    return min(full, cap) if cap else full


def total_epochs(cfg: TrainConfig) -> int:
    """Epochs of the run, cooldown included, as last (re-)planned."""
    return (cfg.replans[-1][2] if cfg.replans else cfg.epochs) + cfg.cooldown_epochs


def planned_steps(cfg: TrainConfig, full: int) -> int:
    return sum(epoch_steps(cfg, e, full) for e in range(total_epochs(cfg)))


def _replan_steps(cfg: TrainConfig, replan: list, full: int) -> int:
    """Optimizer steps left after the re-plan ``[epoch, step, epochs, cap]`` (``cfg`` holding it)."""
    return (replan[2] - replan[0]) * epoch_steps(cfg, replan[0], full)


def _replan(
    epoch: int, step: int, old_left: int, steps_run: int, train_time: float, eval_t: float,
    budget_end: float, full: int,
) -> list | None:
    """[epoch, step, epochs, cap] for the rest of a budget run from the speed of the epoch just run, or None
    when the ``old_left`` steps still planned are within 2% of it."""
    if steps_run < 1:
        return None
    step_t = train_time / steps_run * _HEADROOM
    more, cap = budget_plan(budget_end - time.time(), step_t, eval_t, full)
    if abs(more * (cap or full) - old_left) <= 0.02 * old_left:
        return None
    return [epoch + 1, step, epoch + 1 + more, cap or 0]


def budget_plan(left: float, step_t: float, eval_t: float, steps_per_epoch: int) -> tuple[int, int | None]:
    """(epochs, steps per epoch or None for all) filling ``left`` seconds: as many epochs as needed, each
    capped to the same number of steps, rather than only the whole epochs that fit (2.8 epochs' worth of
    time would otherwise train 2). Every epoch ends with an evaluation taking ``eval_t``."""
    epochs = max(1, math.ceil(left / (steps_per_epoch * step_t + eval_t)))
    cap = max(1, int((left / epochs - eval_t) / step_t + 1e-9))  # epsilon: 200 / 0.2 is 999.99...
    return epochs, (cap if cap < steps_per_epoch else None)


_REPORT_S = 15  # seconds of a time budget kept for the final report and weights
# on measured step times: the deadline keeps the budget if the machine slows down, and a cautious plan
# wastes it (10% headroom left 55 s of the demo's 10 minutes unused)
_HEADROOM = 1.03


def _epochs_for_budget(
    cfg, net, data, loss_fn, dev, t_start: float, steps_per_epoch: int, main: bool
) -> tuple[int, int | None, float]:
    """Epochs, and a cap on steps per epoch, that fill what is left of ``cfg.time_budget`` seconds, from the
    measured speed of a few training steps on a throw-away copy of the model (the RNG streams are restored, so
    the run itself is unaffected); and the deadline after which no training step starts, so that the last
    evaluation and the final report still fit the budget if the machine slows down."""
    # the first steps of a fresh model run slower than later ones (here the demo's 136-144 ms, then 95-105
    # from about the tenth): time 12 and keep the later half
    n = 12
    with torch.random.fork_rng(devices=[]):
        m = copy.deepcopy(net).train()
        opt = build_optimizer(m, "adamw", 0.0, 0.0)  # the run's optimizer kind (fused when possible)
        data.train_loader.set_epoch(0)
        times = []
        t = time.time()
        for i, (x, y) in enumerate(data.train_loader):
            if i == n:
                break
            if x is None:  # no readable image in this batch
                continue
            # the clock runs from the previous step's end, so fetching and augmenting the batch count too:
            # with the model step at 0.13 s the loader's ~0.02 s was a large part of the real step
            x, y = x.to(dev), y.to(dev)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, cfg.amp, cfg.amp_dtype):
                loss = loss_fn(m(x), y)
            loss.backward()
            if cfg.clip_grad:  # ~4 ms of a 0.15 s demo step
                torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.time() - t)
            t = time.time()
        m.eval()
        x, _ = next(iter(data.val_loader))
        with torch.no_grad(), autocast(dev, cfg.amp, cfg.amp_dtype):
            m(x.to(dev))
            t = time.time()
            m(x.to(dev))
            t_eval = time.time() - t
    # median of the later half of the steps (the first ones are warm-up), with the headroom
    warm = sorted(times[len(times) // 2 :] or times)
    headroom = _HEADROOM
    step_t = warm[len(warm) // 2] * cfg.grad_accum_steps * headroom
    eval_t = len(data.val_loader) * t_eval * (2 if cfg.model_ema else 1)  # the EMA weights are evaluated too
    epoch_t = steps_per_epoch * step_t + eval_t
    report_s = _REPORT_S
    left = cfg.time_budget - (time.time() - t_start) - report_s
    epochs, cap = budget_plan(left, step_t, eval_t, steps_per_epoch)
    deadline = t_start + cfg.time_budget - report_s - 1.1 * eval_t
    if main:
        per_epoch = f"{cap} of {steps_per_epoch}" if cap else f"all {steps_per_epoch}"
        print(
            f"time budget {cfg.time_budget:.0f}s: measured {step_t / headroom:.3f}s/step, a full epoch with "
            f"evaluation ~{epoch_t:.0f}s -> {epochs} epoch(s) of {per_epoch} steps",
            flush=True,
        )
    return epochs, cap, deadline


def _dataset_classes(cfg: TrainConfig) -> int:
    from ..data import build_dataset

    return len(build_dataset(cfg.dataset, cfg.data_dir, cfg.train_split).classes)


def _nonfinite(loss: float, epoch: int, step: int, ckpts: CheckpointManager) -> None:
    last = ckpts.latest()
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
    raise NonFiniteLossError(
        f"loss is {loss} at epoch {epoch + 1}, step {step + 1}: stopped without applying this step; "
        f"{keep}. Try a lower --lr, --clip-grad 1.0, or --amp-dtype bfloat16."
    )


def _finish(cfg, run_dir: Path, state_dict, ema, data, result, stopped: bool, logger) -> None:
    from ..weights import save_weights
    from .report import write_report

    if logger:
        logger.close()
    meta = weights_metadata(cfg, data.classes, data.params, top1=result.get("top1"))
    if not stopped or not (run_dir / "model.safetensors").exists():
        save_weights(state_dict, run_dir / "model.safetensors", meta)
        if ema is not None:
            save_weights(ema.module.state_dict(), run_dir / "model_ema.safetensors", meta)
    if stopped:
        return
    write_report(run_dir, cfg, result, data.classes)
