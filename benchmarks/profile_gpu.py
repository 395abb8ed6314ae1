"""Where a GPU step goes: ours vs timm's DaViT with identical weights, per kernel, under torch.profiler.

    python benchmarks/profile_gpu.py          # davit_tiny bf16, inference at batch 256, training at 128
    python benchmarks/profile_gpu.py --device cpu --batch-infer 2 --batch-train 2 --img-size 64   # smoke test

For each mode (inference under inference_mode, training = forward, loss, backward, fused AdamW step, as
`davit bench` runs them) and each model (eager, or with ``--compile``), it warms up, profiles ``--steps``
steps and prints the device time per step, the wall time per step and the kernels with the most device time
(on a CPU: the ops with the most self CPU time). That is the profile issue 4 asks for next to the ratios
of `davit bench`.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from davit import create_model
from davit.bench import DTYPES, _compile, _make_step, _sync, load_timm_weights, timm_counterpart


def _self_device_us(evt) -> float:
    # the attribute's name changed across torch releases (cuda -> device)
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def profile_step(step, device: torch.device, steps: int, top: int, label: str) -> None:
    for _ in range(3):  # warm-up: cuDNN/cuBLAS heuristics, allocator
        step()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    if device.type == "cuda":
        # device work only (kernels, copies): an op's self device time repeats its kernels' time
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        key = lambda e: _self_device_us(e)  # noqa: E731
    else:
        key = lambda e: float(e.self_cpu_time_total)  # noqa: E731
    rows = sorted(events, key=key, reverse=True)
    total = sum(key(e) for e in events)
    unit = "device" if device.type == "cuda" else "CPU"
    per_step = total / 1e3 / steps
    print(f"\n== {label}: wall {wall_ms:.2f} ms/step (profiled), self {unit} time {per_step:.2f} ms/step")
    print(f"{'op':72s} {'ms/step':>8s} {'share':>6s} {'calls/step':>10s}")
    for e in rows[:top]:
        v = key(e)
        if v <= 0:
            break
        print(f"{e.key[:72]:72s} {v / 1e3 / steps:8.3f} {v / total:6.1%} {e.count / steps:10.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="davit_tiny")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-infer", type=int, default=256)
    p.add_argument("--batch-train", type=int, default=128)
    p.add_argument("--modes", default="infer,train")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--compile", action="store_true", help="torch.compile both models (ours fullgraph)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    ours = create_model(args.model).to(device)
    peer = timm_counterpart(args.model, ours.num_classes, ours.in_chans).to(device)
    load_timm_weights(ours, peer)
    for mode in args.modes.split(","):
        bs = args.batch_infer if mode == "infer" else args.batch_train
        x = torch.randn(bs, ours.in_chans, args.img_size, args.img_size, device=device)
        for name, m in (("ours", ours), ("timm", peer)):
            m.train(mode == "train")
            fn = m
            if args.compile:
                fn = _compile(m, "default", fullgraph=name == "ours", dynamic="batch")
                torch._dynamo.mark_dynamic(x, 0)
            step, opt = _make_step(fn, x, mode, dtype, device, m)
            flavour = "compiled" if args.compile else "eager"
            t0 = time.perf_counter()
            step()  # the first call (compiles)
            _sync(device)
            print(f"\n{name} {mode}: first call {time.perf_counter() - t0:.1f} s")
            profile_step(step, device, args.steps, args.top, f"{name} {mode} b{bs} {args.dtype} {flavour}")
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            del step, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
