"""`davit bench`: throughput, peak memory and FLOP efficiency of a DaViT variant, optionally side by side with
timm's port of the same variant carrying identical weights.

Method (so that ratios mean something on a shared or noisy machine):
- every candidate (ours, timm) is warmed up first (the first call is reported as ``compile_s``), then timed
  interleaved A B A B ... for ``--repeats`` rounds of ``--iters`` steps each; the median round is reported;
- the achieved FLOP/s is compared with a square matmul timed in the same process at the same dtype ("peak");
- memory is measured on one extra, untimed step: the bytes allocated during the step above what was live
  before it (CPU: PyTorch profiler allocation events; CUDA: ``max_memory_allocated``), plus the model state
  (parameters, buffers and, in training, gradients and optimizer state);
- ``--gemm-floor`` times a third candidate in the same rounds: the step's linear and dense-convolution GEMMs
  alone (:mod:`davit.gemm_floor`), what no port that runs them through torch's GEMMs can go below.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cli import positive_int
from .gemm_floor import GemmReplay, capture_model_gemms
from .layers.fused import packed_weight_bytes
from .models import create_model, model_info
from .train.optim import fused_kwargs

__all__ = [
    "Candidate",
    "matmul_peak_tflops",
    "timm_counterpart",
    "load_timm_weights",
    "step_memory",
    "run_bench",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# our variant -> timm's name for the same architecture (timm's huge/giant are our *_k2; variants without a
# timm counterpart are absent)
TIMM_NAMES = {
    n: n for n in ("davit_tiny", "davit_small", "davit_base", "davit_large", "davit_base_fl", "davit_huge_fl")
}
TIMM_NAMES.update(davit_huge_k2="davit_huge", davit_giant_k2="davit_giant")


@dataclass
class Candidate:
    """One thing being timed: a step function plus what it reports."""

    name: str  # "ours" | "timm"
    step: Callable[[], Any]
    state_bytes: Callable[[], int]
    before_memory: Callable[[], Any] | None = None  # run outside the memory-measured step
    times: list[float] = field(default_factory=list)  # seconds per step, one entry per round
    compile_s: float = 0.0
    step_peak_bytes: int | None = None
    memory: bool = True  # measure its step's peak memory (not for the GEMM floor)


# ----- measurement primitives -------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[], Any], iters: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, n: int = 4096, repeats: int = 3) -> float:
    """Median TFLOP/s of an (n x n) @ (n x n) matmul: the reference "peak" for the efficiency fraction."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _time_steps(lambda: a @ b, 1, device)  # warm-up (library init, autotuning)
    iters = 1  # enough calls per timing that small sizes are not dominated by call overhead
    while iters < 2**16 and _time_steps(lambda: a @ b, iters, device) * iters < 0.05:
        iters *= 2
    times = [_time_steps(lambda: a @ b, iters, device) for _ in range(repeats)]
    return 2 * n**3 / statistics.median(times) / 1e12


def step_memory(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``step`` above the bytes live before it."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    # CPU has no allocator statistics; the profiler records every allocation with the running total of bytes
    # allocated since profiling started (c10's CPU memory reporter); the peak of that total is the step peak.
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocs.append(
                (node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size)
            )
        stack.extend(node.children)
    if not allocs:
        return 0
    allocs.sort()
    base = allocs[0][1] - allocs[0][2]
    return max(0, max(a[1] for a in allocs) - base)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer | None = None, packed: bool = False) -> int:
    """Memory kept between steps: weights, buffers, optimizer state (gradients belong to the step); with
    ``packed``, ours' packed inference weights too (davit.layers.fused.packed_weight)."""
    n = _tensor_bytes(model.parameters()) + _tensor_bytes(model.buffers())
    if packed:
        n += packed_weight_bytes()
    if opt is not None:
        n += sum(_tensor_bytes(s.values()) for s in opt.state.values())
    return n


def gflop_per_image(name: str, img_size: int, train: bool, num_classes: int | None = None) -> float:
    """GFLOP (2 x MACs) of one image: forward, or forward + backward when ``train``.

    Counted by FlopCounterMode on the meta device, except the backward of convolutions: its formula ignores
    ``groups`` and overcounts the depthwise position-encoding convs ~15x, so convs are charged the standard 2x
    their forward instead.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes)
    x = torch.zeros(1, model.in_chans, img_size, img_size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(train):
        out = model(x)
        if train:
            out.float().sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    total = counter.get_total_flops()
    if train:
        total += 2 * counts.get("aten.convolution", 0) - counts.get("aten.convolution_backward", 0)
    return total / 1e9


# ----- timm peer --------------------------------------------------------------------------------------------
def timm_counterpart(name: str, num_classes: int, in_chans: int = 3) -> nn.Module:
    """timm's model of the same variant (random init; load ours' weights with :func:`load_timm_weights`)."""
    try:
        import timm
    except ImportError as e:
        raise RuntimeError(
            "--vs-timm needs timm, a test/benchmark dependency: pip install 'davit-pytorch[dev]' or timm"
        ) from e
    if name not in TIMM_NAMES:
        raise ValueError(
            f"{name} has no timm counterpart; --vs-timm works for: {', '.join(sorted(TIMM_NAMES))}"
        )
    return timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=num_classes, in_chans=in_chans)


def load_timm_weights(ours: nn.Module, peer: nn.Module) -> None:
    """Copy timm's weights into ours: names are equal, except that timm's *_fl towers name the two blocks
    of a pair ``spatial_block``/``channel_block`` where ours index them 0/1."""
    sd = {
        k.replace(".spatial_block.", ".0.").replace(".channel_block.", ".1."): v
        for k, v in peer.state_dict().items()
    }
    ours.load_state_dict(sd, strict=True)


# ----- the benchmark ----------------------------------------------------------------------------------------
def _random_batch(bs: int, chans: int, img: int, device: torch.device, channels_last: bool) -> Tensor:
    x = torch.randn(bs, chans, img, img, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _make_step(
    model: nn.Module | Callable,
    x: Tensor,
    mode: str,
    dtype: torch.dtype,
    device: torch.device,
    params: nn.Module | None,
) -> tuple[Callable[[], Any], torch.optim.Optimizer | None]:
    amp = dtype != torch.float32
    if mode == "infer":

        def infer() -> Any:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                return model(x)

        return infer, None
    # the trainer's optimizer (fused when possible), the same for both models
    opt = torch.optim.AdamW(params.parameters(), lr=1e-4, **fused_kwargs(params.parameters()))
    holder: dict[str, Tensor] = {}

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out = model(x)
            if "y" not in holder:  # targets sized to the output (the Florence-2 towers return features)
                holder["y"] = torch.randint(0, out.shape[-1], (x.shape[0],), device=device)
            loss = F.cross_entropy(out.float(), holder["y"])
        loss.backward()
        opt.step()

    return train, opt


def _compile(model: nn.Module, mode: str, fullgraph: bool, dynamic: str, freezing: bool = False) -> Callable:
    from torch._inductor import list_mode_options

    from .compile_cache import compile_options

    # torch.compile takes a mode or options, not both: the mode's own options (list_mode_options(None) is
    # every mode's table, so the default mode's are none), freezing where asked (the option also makes a
    # distinct backend, so dynamo does not reuse an unfrozen graph cached earlier in the process for the same
    # forward: with the global flag alone, a frozen davit_atto run after an unfrozen one in the test suite
    # packed no weights), and the pass that keys inductor's caches on davit's operator code (compile_cache)
    options = dict(list_mode_options(mode)) if mode != "default" else {}
    if freezing:
        options["freezing"] = True
    kw: dict[str, Any] = dict(fullgraph=fullgraph, options=compile_options(options))
    if dynamic == "all":
        kw["dynamic"] = True
    elif dynamic == "static":
        kw["dynamic"] = False
    return torch.compile(model, **kw)


def _ort_step(model: nn.Module, x: Tensor, img_size: int, threads: int) -> Callable[[], Any]:
    import tempfile

    from .export import export_onnx, ort_session

    # onnxruntime reads the whole graph and its weights when the session is made, so the file (12 MB for
    # davit_atto, 110 MB for davit_tiny) goes at once; it was left in the temp directory on every run
    with tempfile.TemporaryDirectory(prefix="davit-bench-") as d:
        path = os.path.join(d, "model.onnx")
        export_onnx(model, path, img_size=img_size)
        sess = ort_session(path, threads=threads)
    feed = {sess.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: sess.run(None, feed)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.freezing and (not args.compile or args.mode != "infer"):
        raise ValueError(
            "--freezing is inductor's option for compiled inference (it folds the weights into the graph): "
            "use it with --compile and --mode infer"
        )
    if not args.freezing:
        return _bench(args)
    # inductor's global flag as well as _compile's option: dynamo reads the flag when it traces
    # (torch._dynamo.utils.is_parameter_freezing) to make the weights constants rather than graph inputs; the
    # option reaches inductor only afterwards, and alone it folded nothing (session 31)
    from torch._inductor import config as inductor_config

    with inductor_config.patch(freezing=True):
        return _bench(args)


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r} is not a device name: use cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device}: davit bench times cpu or cuda (cuda:N)")
    if args.infer_slices is not None and args.infer_slices < 0:
        raise ValueError(f"--infer-slices must be >= 0 (0: the whole batch at once), got {args.infer_slices}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is visible; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = None
    if device.type == "cpu":
        # glibc's defaults by default: what both models get in a user's own script. `davit train` tunes malloc
        # (davit.alloc), which removes most of the page faults of the allocations; timm's many temporaries
        # gain more from it than ours (docs/benchmarks.md, session 21)
        from .alloc import malloc_setting, tune_malloc

        malloc = tune_malloc() if args.malloc == "tuned" else malloc_setting()
        malloc = malloc or "glibc malloc: defaults (--malloc tuned: as davit train sets it)"
        print(malloc)
    dtype = DTYPES[args.dtype]
    if args.backend == "onnxruntime" and (args.mode != "infer" or dtype != torch.float32 or args.compile):
        raise ValueError(
            "--backend onnxruntime times fp32 inference only: use --mode infer --dtype fp32, no --compile"
        )
    info = model_info(args.model)
    img = args.img_size or info["input_size"][1]
    modes = ["infer", "train"] if args.mode == "both" else [args.mode]
    torch.manual_seed(0)

    ours = create_model(args.model, num_classes=args.num_classes).to(device)
    ours.set_fast(not args.reference)
    if args.infer_slices is not None:
        ours.set_inference_slices(args.infer_slices)
    slice_tokens = ours.stages[0].infer_chunk_tokens
    peer, max_diff = None, None
    if args.vs_timm:
        peer = timm_counterpart(args.model, ours.num_classes, ours.in_chans).to(device)
        load_timm_weights(ours, peer)
        max_diff = _agreement(ours, peer, img, device)
        print(f"agreement ours vs timm (fp32 eval, {img} px): max abs diff {max_diff:.2e}")
        if max_diff > 1e-4:
            raise RuntimeError(f"ours and timm disagree by {max_diff:.2e} > 1e-4 with identical weights")
    models = {"ours": ours} if peer is None else {"ours": ours, "timm": peer}
    if args.channels_last:
        for m in models.values():
            m.to(memory_format=torch.channels_last)

    peak = matmul_peak_tflops(dtype, device, args.peak_n)
    print(f"matmul peak ({args.peak_n}^3 {args.dtype}, {device.type}): {peak * 1e3:.1f} GFLOP/s")
    if device.type == "cpu":
        from .layers.fused import (
            PACK_MAX_ELEMENTS,
            compiled_packed_weights_enabled,
            inference_onednn_gemms_enabled,
            onednn_compiled_inference_enabled,
            onednn_training_enabled,
            packed_weights_enabled,
            plain_train_mlp_enabled,
        )
        from .models import patch_linear_side

        # which GEMM library ours' training linears use here (by CPU, see the op's docstring)
        lib = "oneDNN" if onednn_training_enabled() else "F.linear (MKL)"
        if not onednn_training_enabled() and plain_train_mlp_enabled():
            lib += "; MLPs as one function with the native bias + GELU"
        side = patch_linear_side()
        lib += f"; downsampling of maps up to {side} x {side} as linears on 2x2 patches"
        print(f"ours' fp32 training linears: {lib} (DAVIT_ONEDNN_TRAINING=0/1 overrides)")
        where = f"slices of ~{slice_tokens} tokens" if slice_tokens > 0 else "the whole batch"
        gemms = "oneDNN, fused" if inference_onednn_gemms_enabled() else "MKL's GEMMs, epilogue in place"
        if packed_weights_enabled():
            gemms += f"; weights up to {PACK_MAX_ELEMENTS} elements packed for oneDNN"
        gemms += " (DAVIT_ONEDNN_INFERENCE_GEMMS, DAVIT_INFER_PACKED_WEIGHTS=0/1 override)"
        print(f"ours' eager CPU inference: each stage on {where} (--infer-slices TOKENS, 0: whole batch)")
        print(f"ours' CPU inference linears: {gemms}")
        attn = _window_attention_kind()
        print(
            f"ours' CPU fp32 window and channel attention and position encodings (inference and training): "
            f"{attn} "
            "(DAVIT_NATIVE_KERNELS=0/1)"
        )
        if args.compile and args.mode in ("infer", "both") and dtype == torch.float32:
            from .layers.fused import INFER_OP_CHUNK_TOKENS

            how = (
                "norms with MLPs and attentions as opaque oneDNN ops on chunks of "
                f"~{INFER_OP_CHUNK_TOKENS} tokens"
                if onednn_compiled_inference_enabled()
                else "inductor's graph with F.linear"
            )
            if onednn_compiled_inference_enabled() and compiled_packed_weights_enabled():
                how += f", weights up to {PACK_MAX_ELEMENTS} elements packed"
            how += " (DAVIT_ONEDNN_COMPILED_INFERENCE, DAVIT_COMPILED_PACKED_WEIGHTS=0/1 override)"
            print(f"ours' compiled CPU inference: {how}")
    triton_ln = None
    if device.type == "cuda":
        from .layers.norm import triton_layer_norm_enabled

        triton_ln = triton_layer_norm_enabled()
        kind = "Triton kernel" if triton_ln else "F.layer_norm"
        print(f"ours' eager-inference layer norms: {kind} (DAVIT_TRITON_LAYERNORM=1 selects the kernel)")
    flavour = (
        args.backend
        if args.backend != "torch"
        else (f"compiled({args.compile}{', frozen' if args.freezing else ''})" if args.compile else "eager")
    )
    report: dict[str, Any] = dict(
        model=args.model,
        img_size=img,
        dtype=args.dtype,
        device=str(device),
        threads=torch.get_num_threads(),
        malloc=malloc,
        channels_last=args.channels_last,
        compile=args.compile,
        freezing=args.freezing,
        dynamic=args.dynamic,
        backend=args.backend,
        reference_path=args.reference,
        repeats=args.repeats,
        warmup=args.warmup,
        vs_timm=args.vs_timm,
        agreement_max_abs_diff=max_diff,
        triton_layernorm=triton_ln,
        infer_slice_tokens=slice_tokens if device.type == "cpu" else None,
        matmul_peak_tflops=peak,
        matmul_peak_n=args.peak_n,
        **environment(),
        results=[],
        ratios=[],
    )
    for mode in modes:
        bs = args.batch_size or _default_batch(mode, device)
        gflop = gflop_per_image(args.model, img, mode == "train", args.num_classes)
        cands = []
        # a fresh random input per candidate: each may mark its batch axis dynamic
        batch = partial(_random_batch, bs, ours.in_chans, img, device, args.channels_last)
        for name, m in models.items():
            m.train(mode == "train")
            x = batch()
            if name == "ours" and args.backend == "onnxruntime":
                step, opt = _ort_step(m.eval(), x, img, torch.get_num_threads()), None
            else:
                fn: Any = m
                if args.compile:
                    fn = _compile(m, args.compile, name == "ours", args.dynamic, args.freezing)
                    if args.dynamic == "batch" and bs > 1:  # one graph for every batch size: no recompiles
                        torch._dynamo.mark_dynamic(x, 0)
                step, opt = _make_step(fn, x, mode, dtype, device, m)
            # free the last step's gradients before the memory step, so that it allocates (and counts) its own
            drop = None if opt is None else (lambda opt=opt: opt.zero_grad(set_to_none=True))
            state = partial(_state_bytes, m, opt, name == "ours")
            cands.append(Candidate(name, step, state, drop))
        floor = None
        if args.gemm_floor:
            replay = GemmReplay(capture_model_gemms(ours, batch(), mode == "train", dtype))
            floor = Candidate("gemm floor", replay, lambda: 0, memory=False)
            cands.append(floor)
        _measure(cands, args, device)
        if floor is not None:
            cands.remove(floor)
        for c in cands:
            med = statistics.median(c.times)
            res = dict(
                impl=c.name,
                mode=mode,
                flavour=flavour if c.name == "ours" or args.backend == "torch" else "eager",
                batch_size=bs,
                img_per_s=bs / med,
                step_ms=med * 1e3,
                times_ms=[t * 1e3 for t in c.times],
                compile_s=c.compile_s,
                gflop_per_img=gflop,
                tflops=gflop * bs / med / 1e3,
                state_mb=c.state_bytes() / 2**20,
                step_peak_mb=None if c.step_peak_bytes is None else c.step_peak_bytes / 2**20,
            )
            res["frac_peak"] = res["tflops"] / peak
            res["peak_mem_mb"] = (
                None if res["step_peak_mb"] is None else res["state_mb"] + res["step_peak_mb"]
            )
            report["results"].append(res)
            _print_result(res)
        if peer is not None:
            o, t = report["results"][-2], report["results"][-1]
            label = (
                f"{mode} {o['flavour']}"
                if o["flavour"] == t["flavour"]
                else f"{mode} {o['flavour']}/{t['flavour']}"
            )
            ratio = o["img_per_s"] / t["img_per_s"]
            # the rounds ran interleaved, so round i of each saw the same machine state: the spread of the
            # per-round ratios says how far a single ratio can be trusted on a noisy machine
            rounds = [tt / ot for ot, tt in zip(o["times_ms"], t["times_ms"])]
            report["ratios"].append(
                dict(
                    mode=mode,
                    label=label,
                    ratio=ratio,
                    ours=o["img_per_s"],
                    timm=t["img_per_s"],
                    round_ratios=rounds,
                )
            )
            spread = f"; rounds {min(rounds):.2f}-{max(rounds):.2f}x" if len(rounds) > 1 else ""
            print(
                f"ratio ours/timm {label}: {ratio:.2f}x (ours {_fmt(o['img_per_s'])} img/s, "
                f"timm {_fmt(t['img_per_s'])} img/s, median of {args.repeats}{spread})"
            )
        if floor is not None:
            steps = {r["impl"]: r["step_ms"] for r in report["results"][-len(cands) :]}
            entry = gemm_floor_entry(mode, floor, replay, steps)
            report.setdefault("gemm_floor", []).append(entry)
            _print_floor(entry, args.repeats)
    return report


def gemm_floor_entry(mode: str, floor: Candidate, replay: GemmReplay, steps_ms: dict[str, float]) -> dict:
    """The GEMM floor's figures for one mode: its median time, rate, and where each timed model stands
    against it (``steps_ms``: each model's median step in the same rounds)."""
    ms = statistics.median(floor.times) * 1e3
    entry: dict[str, Any] = dict(
        mode=mode,
        step_ms=ms,
        times_ms=[t * 1e3 for t in floor.times],
        calls=len(replay.calls),
        gflop=replay.flops / 1e9,
        gflop_per_s=replay.flops / 1e9 / (ms / 1e3),
    )
    for impl, step in steps_ms.items():
        entry[f"{impl}_above_ms"] = step - ms
        entry[f"{impl}_over_floor"] = step / ms
    return entry


def _print_floor(e: dict, repeats: int) -> None:
    above = ", ".join(
        f"{impl} {e[f'{impl}_above_ms']:+.1f} ms above it"
        for impl in ("ours", "timm")
        if f"{impl}_above_ms" in e
    )
    line = (
        f"GEMM floor {e['mode']}: {e['step_ms']:.1f} ms ({e['calls']} GEMMs of the linears and dense "
        f"convolutions alone, {e['gflop']:.1f} GFLOP at {e['gflop_per_s']:.1f} GFLOP/s, median of "
        f"{repeats}); {above}"
    )
    if "timm_over_floor" in e:
        # a port that did nothing but these GEMMs would be this much faster than timm: the bound on any ratio
        line += (
            f"; timm's step is {e['timm_over_floor']:.2f}x it, the most any port with these GEMMs can gain"
        )
    print(line)


def _fmt(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def _default_batch(mode: str, device: torch.device) -> int:
    if device.type == "cuda":
        return 256 if mode == "infer" else 128
    return 16 if mode == "infer" else 8


def _agreement(ours: nn.Module, peer: nn.Module, img: int, device: torch.device) -> float:
    ours.eval(), peer.eval()
    x = torch.randn(2, ours.in_chans, img, img, device=device)
    with torch.inference_mode(), full_fp32():
        return (ours(x) - peer(x)).abs().max().item()


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls without TF32 on CUDA. cuDNN's convolutions default to TF32 (a 10-bit
    mantissa), so two correct models would differ by ~1e-3 depending on which algorithm each call picks: the
    1e-4 agreement check is meaningful in true fp32 only."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def _measure(cands: list[Candidate], args: argparse.Namespace, device: torch.device) -> None:
    for c in cands:  # warm-up: the first call includes compilation, reported separately
        c.compile_s = _time_steps(c.step, 1, device)
        for _ in range(max(0, args.warmup - 1)):
            c.step()
    iters = args.iters or (1 if device.type == "cpu" else 20)
    for _ in range(args.repeats):  # interleaved rounds: A B A B ...
        for c in cands:
            c.times.append(_time_steps(c.step, iters, device))
    if not args.no_memory:
        for c in cands:
            if not c.memory:
                continue
            if c.before_memory is not None:
                c.before_memory()
            c.step_peak_bytes = (
                None if args.backend == "onnxruntime" and c.name == "ours" else step_memory(c.step, device)
            )


def _print_result(r: dict[str, Any]) -> None:
    mem = (
        "n/a"
        if r["peak_mem_mb"] is None
        else f"{r['peak_mem_mb']:.0f} MB (state {r['state_mb']:.0f} + step {r['step_peak_mb']:.0f})"
    )
    print(
        f"{r['impl']:>4} {r['mode']:<5} {r['flavour']:<18} b={r['batch_size']:<4} "
        f"{r['img_per_s']:8.2f} img/s  "
        f"step {r['step_ms']:8.1f} ms  first call {r['compile_s']:6.1f} s  {r['tflops'] * 1e3:7.1f} GFLOP/s "
        f"({100 * r['frac_peak']:.0f}% of matmul)  peak mem {mem}"
    )


def environment() -> dict[str, Any]:
    """Machine, versions, date and load, recorded next to every measurement."""
    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = None
    import os

    try:  # which code was measured: the commit, "-dirty" when the working tree had uncommitted changes
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = ["git", "-C", here, "describe", "--always", "--dirty"]
        rev = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None

    env = dict(
        cpu=cpu,
        cores=os.cpu_count(),
        torch=torch.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        loadavg=load,
        git=rev,
        command=" ".join(["davit bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else "(in-process)",
    )
    from .layers.fused import (
        compiled_packed_weights_enabled,
        inference_onednn_gemms_enabled,
        onednn_compiled_inference_enabled,
        onednn_training_enabled,
        packed_weights_enabled,
    )

    env["onednn_training_linears"] = onednn_training_enabled()
    env["packed_inference_weights"] = packed_weights_enabled()
    env["onednn_inference_gemms"] = inference_onednn_gemms_enabled()
    env["onednn_compiled_inference"] = onednn_compiled_inference_enabled()
    env["compiled_packed_weights"] = compiled_packed_weights_enabled()
    from .layers.native import channel_attention_kernel_enabled, native_library

    env["native_window_attention"] = native_library() is not None
    env["native_channel_attention"] = env["native_window_attention"] and channel_attention_kernel_enabled()
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _window_attention_kind() -> str:
    """Which kernels ours' CPU fp32 inference and training attend windows and channel groups with
    (davit.layers.native), and why."""
    from .layers.native import MAX_WINDOW_TOKENS, native_kernels_reason, native_library

    if native_library() is not None:
        return (
            f"native kernels (windows of up to {MAX_WINDOW_TOKENS} tokens, else torch's SDPA; position "
            "encodings of widths that are multiples of 16, else torch's convolution; channel groups of 16, "
            "32 or 64 channels, else torch's matmuls)"
        )
    why = native_kernels_reason().strip().splitlines() or ["no reason given"]
    return f"torch's SDPA, convolution and matmuls (native kernels {why[0][:200]})"


# ----- CLI --------------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput/memory/FLOP efficiency, optionally side by side with timm")
    p.add_argument("--model", default="davit_tiny")
    p.add_argument("--mode", choices=["infer", "train", "both"], default="infer")
    p.add_argument(
        "-b",
        "--batch-size",
        type=positive_int,
        default=None,
        help="default: 16 infer / 8 train on CPU, 256 / 128 on CUDA",
    )
    p.add_argument("--img-size", type=positive_int, default=None, help="default: the variant's input size")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="bf16/fp16 run under autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile (ours with fullgraph=True); the first call is reported as compile time",
    )
    p.add_argument(
        "--freezing",
        action="store_true",
        help="with --compile --mode infer: inductor's freezing for both models (weights as constants)",
    )
    p.add_argument(
        "--dynamic",
        choices=["batch", "auto", "all", "static"],
        default="batch",
        help="compiled shapes: batch = batch dim symbolic (no recompile per batch size)",
    )
    p.add_argument(
        "--malloc",
        choices=["default", "tuned"],
        default="default",
        help="CPU: glibc malloc's defaults, or its thresholds as davit train sets them (davit.alloc)",
    )
    p.add_argument(
        "--infer-slices",
        type=int,
        default=None,
        metavar="TOKENS",
        help="CPU eager inference: ours runs each stage on batch slices of ~TOKENS tokens (0: the whole "
        "batch; default: the model's, davit.models.INFER_CHUNK_TOKENS)",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "onnxruntime"],
        default="torch",
        help="onnxruntime: export ours to ONNX and time it (timm stays PyTorch eager)",
    )
    p.add_argument(
        "--vs-timm", action="store_true", help="time timm's model with identical weights, interleaved"
    )
    p.add_argument(
        "--reference", action="store_true", help="time our literal reference path (set_fast(False))"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate (first = compile)")
    p.add_argument(
        "--iters", type=positive_int, default=None, help="steps per round (default 1 CPU, 20 CUDA)"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--peak-n", type=positive_int, default=4096, help="side of the reference matmul")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement step")
    p.add_argument(
        "--gemm-floor",
        action="store_true",
        help="also time the step's linear and dense-convolution GEMMs alone, in the same rounds: a time no "
        "port running them through torch's GEMMs goes below, so timm's step over it bounds any ratio",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="write all results as JSON")
    p.set_defaults(func=cmd_bench)


def json_target(path: str) -> Path:
    """The ``--json`` file, checked before anything runs: a bad path must not cost minutes of benchmark
    (it used to fail only when writing, after the runs). Creates missing folders, as ``davit export`` does."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--json {path} is a folder: name a file, e.g. {p / 'bench.json'} (nothing ran)")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"--json {path}: cannot create the folder {p.parent} ({e.strerror or e}); pick a writable path "
            "(nothing ran)"
        ) from e
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"--json {path} is not writable: pick another path (nothing ran)")
    return p


def write_json(path: Path, report: dict) -> None:
    """Write ``report`` to ``path`` whole or not at all (the trainer's atomic write), so a file already there
    survives a failed write. If the write fails, the JSON goes to stdout first, so the results are kept."""
    from .train.checkpoint import CheckpointError, atomic_write

    text = json.dumps(report, indent=2)
    try:
        atomic_write(path, (text + "\n").encode())
    except CheckpointError as e:  # its message speaks of checkpoints: say what happened here instead
        cause = e.__cause__
        why = getattr(cause, "strerror", None) or cause or e
        print(text)
        raise RuntimeError(f"could not write --json {path} ({why}); the results are printed above") from e
    print(f"wrote {path}")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.warmup < 1:
        raise ValueError("--repeats and --warmup must be >= 1 (the first call compiles/initialises)")
    target = json_target(args.json) if args.json else None
    if hasattr(sys.stdout, "reconfigure"):  # progress shows up line by line under tee/grep during long runs
        sys.stdout.reconfigure(line_buffering=True)
    report = run_bench(args)
    if target is not None:
        write_json(target, report)
    return 0
