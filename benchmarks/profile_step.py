"""Time and profile one training step of the CPU demos' models: where does an iteration go on this machine?

    .venv/bin/python benchmarks/profile_step.py --task classify            # the Fashion-MNIST demo's step
    .venv/bin/python benchmarks/profile_step.py --task segment --by-shape  # the UperNet demo's, per op shape
    .venv/bin/python benchmarks/profile_step.py --task vs-timm             # davit_tiny ours vs timm, per op
    .venv/bin/python benchmarks/profile_step.py --task vs-floor            # ours' step vs its GEMMs alone
    .venv/bin/python benchmarks/profile_step.py --task vs-floor --mode infer --compile  # compiled forward
    .venv/bin/python benchmarks/profile_step.py --task gemm-rates --between-timm  # every GEMM's rate

The step is the trainers' sequence: forward, loss, backward (for ``classify`` the gradient clipping too), a
fused AdamW step, on random inputs of the demos' sizes (batch 64 of 28 px grey images; batch 16 of 64 px RGB
crops), with the models built from the demos' presets. It prints the median step time of ``--rounds`` rounds
of ``--steps`` steps after a warm-up, then torch.profiler's table of the ops by self CPU time (``--by-shape``:
the top shapes of the heaviest ops). Data loading is not included: see the docs for its cost.

``--task vs-timm`` profiles the forward and backward of ``--model`` (davit_tiny) at 224 px, batch 8, for ours
and timm's model with the same weights, in interleaved rounds, and prints each op's median self time per step
side by side: where one model spends time the other does not.

``--task vs-floor`` profiles ours' ``davit bench`` step (``--mode train``: batch 8 with the fused AdamW step;
``infer``: batch 16) against the replay of its linear and dense-convolution GEMMs alone (the GEMM floor,
``davit.gemm_floor``), in interleaved rounds, and prints each op's self time per step in both and the
difference, largest first: the time that is not one of those GEMMs, op by op.

``--task gemm-rates`` times every op of ours' ``davit bench`` step (``--mode train``, batch 8, or ``infer``,
batch 16) by the wall clock around its call under a ``TorchDispatchMode`` (no profiler): the GEMMs (linears,
their gradients, convolutions, matrix products) grouped by op and operand shapes with their FLOPs and
GFLOP/s, the total GEMM rate, the other ops by name, and the part of the plain step no dispatched op accounts
for (the native kernels that Python calls directly, such as the norms and bias + GELU, and Python itself).
``--between-timm`` runs timm's step (untimed) before each of ours', as ``davit bench``'s alternation does:
the heap, and so the page faults of ours' fresh outputs, then match the bench's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def classify_step(batch: int) -> Callable[[], None]:
    from davit.train.config import resolve_config
    from davit.train.optim import build_optimizer
    from davit.train.setup import build_model

    cfg = resolve_config("fashion-mnist", None, {"device": "cpu"})
    model = build_model(cfg, cfg.num_classes, cfg.in_chans, verbose=False)
    opt = build_optimizer(model, cfg.opt, cfg.lr, cfg.weight_decay, cfg.opt_eps, tuple(cfg.opt_betas))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (batch,))

    def step() -> None:
        loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def segment_step(batch: int) -> Callable[[], None]:
    from davit.tasks.config import resolve_task_config
    from davit.tasks.detection import detector_param_groups
    from davit.tasks.engine import build_model
    from davit.train.optim import fused_kwargs

    cfg = resolve_task_config("segment", "scenes-upernet-demo")
    model = build_model(cfg, backbone_weights=False).train()
    groups = detector_param_groups(model, cfg.weight_decay, cfg.decay_1d_params)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **fused_kwargs(model.parameters()))
    x = torch.randn(batch, 3, cfg.crop_size, cfg.crop_size)
    y = torch.randint(0, cfg.num_classes, (batch, cfg.crop_size, cfg.crop_size))

    def step() -> None:
        model(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile_rounds(
    runs: dict[str, Callable[[], object]], rounds: int, steps: int
) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """Profile each of ``runs`` for ``steps`` steps per round (one untimed step first), the order turned each
    round. Returns, per run, each op's median self CPU time per step in ms over the rounds (0 in rounds where
    it did not run), and the run's total self time per step in every round."""
    from torch.profiler import ProfilerActivity, profile

    names = list(runs)
    per_op: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    totals: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            runs[name]()  # warm
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    runs[name]()
            events = prof.key_averages()
            for e in events:
                per_op[name].setdefault(e.key, []).append(e.self_cpu_time_total / 1000 / steps)
            totals[name].append(sum(e.self_cpu_time_total for e in events) / 1000 / steps)
    medians = {
        n: {op: statistics.median(v + [0.0] * (rounds - len(v))) for op, v in ops.items()}
        for n, ops in per_op.items()
    }
    return medians, totals


def compare_with_timm(model: str, batch: int, img_size: int, rounds: int, steps: int, rows: int) -> None:
    from davit import create_model
    from davit.bench import load_timm_weights, timm_counterpart

    ours = create_model(model).train()
    peer = timm_counterpart(model, ours.num_classes).train()
    load_timm_weights(ours, peer)
    x = torch.randn(batch, 3, img_size, img_size)

    def fwd_bwd(net: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            # as in training: each step's backward writes fresh gradients, it does not add to them
            net.zero_grad(set_to_none=True)
            net(x).sum().backward()

        return step

    med, totals = profile_rounds({"ours": fwd_bwd(ours), "timm": fwd_bwd(peer)}, rounds, steps)
    o, t = med["ours"], med["timm"]
    print(
        f"{model} b{batch} {img_size} px forward + backward, {rounds} interleaved rounds of {steps} steps; "
        "ms per step"
    )
    print("totals ours", [round(t) for t in totals["ours"]], "timm", [round(t) for t in totals["timm"]])
    keys = sorted(set(o) | set(t), key=lambda k: -max(o.get(k, 0.0), t.get(k, 0.0)))
    print(f"{'op':64s} {'ours':>8s} {'timm':>8s}")
    for k in keys[:rows]:
        print(f"{k[:64]:64s} {o.get(k, 0.0):8.1f} {t.get(k, 0.0):8.1f}")


def compare_with_floor(
    model: str,
    mode: str,
    batch: int | None,
    img_size: int,
    rounds: int,
    steps: int,
    rows: int,
    compiled: bool = False,
) -> None:
    from davit import create_model
    from davit.bench import _compile, _make_step
    from davit.gemm_floor import GemmReplay, capture_model_gemms

    train = mode == "train"
    net = create_model(model).train(train)
    x = torch.randn(batch or (8 if train else 16), 3, img_size, img_size)
    fn: Callable = net
    if compiled:  # as `davit bench --compile`: fullgraph, the batch axis symbolic
        fn = _compile(net, "default", fullgraph=True, dynamic="batch")
        torch._dynamo.mark_dynamic(x, 0)
    step, _ = _make_step(fn, x, mode, torch.float32, torch.device("cpu"), net)
    replay = GemmReplay(capture_model_gemms(net, x, train))
    step()  # the optimizer's state is made on its first step
    med, totals = profile_rounds({"step": step, "floor": replay}, rounds, steps)
    a, b = med["step"], med["floor"]
    total = {n: statistics.median(t) for n, t in totals.items()}
    print(
        f"{model} {mode}{' compiled' if compiled else ''} b{x.shape[0]} {img_size} px: ours' step vs its "
        f"{len(replay.calls)} GEMMs alone, "
        f"{rounds} interleaved rounds of {steps}; ms per step under the profiler: step {total['step']:.0f}, "
        f"floor {total['floor']:.0f}"
    )
    keys = sorted(set(a) | set(b), key=lambda k: b.get(k, 0.0) - a.get(k, 0.0))
    print(f"{'op':64s} {'step':>8s} {'floor':>8s} {'diff':>8s}")
    for k in keys[:rows]:
        s, f = a.get(k, 0.0), b.get(k, 0.0)
        print(f"{k[:64]:64s} {s:8.1f} {f:8.1f} {s - f:8.1f}")


def gemm_flops(name: str, args: tuple, out: object) -> int | None:
    """Floating-point operations of one dispatched call if it is a GEMM (a linear, its gradients, a
    convolution or a matrix product), else None. ``name``: the op's ``str``."""
    if "linear_weight_grad" in name:  # davit::linear_weight_grad(g (M, N), x (M, K), bias)
        g, x = args[0], args[1]
        return 2 * g.shape[0] * g.shape[1] * x.shape[1]
    if "_linear_pointwise" in name or "onednn_linear" in name or name.startswith("aten.linear."):
        # x (..., K), weight (N, K); the binary form takes the epilogue's operand second, the weight third
        x, w = args[0], args[2] if name.endswith(".binary") else args[1]
        return 2 * (x.numel() // x.shape[-1]) * x.shape[-1] * w.shape[0] if w.dim() == 2 else None
    if "convolution_backward" in name:  # (grad, input, weight, ..., output_mask): input and weight grads
        grad, w, mask = args[0], args[2], args[10]
        return 2 * grad.numel() * (w.numel() // w.shape[0]) * (int(mask[0]) + int(mask[1]))
    if "convolution" in name or name.startswith(("aten.conv1d", "aten.conv2d", "aten.conv3d")):
        # (input, weight, ...): MACs = outputs x (in / groups) x kernel (conv2d: inference, not decomposed)
        return 2 * out.numel() * (args[1].numel() // args[1].shape[0])
    if name.startswith(("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")):
        a, b = args[-2], args[-1]
        return 2 * a.numel() * b.shape[-1]
    return None


def gemm_rates(
    model: str, mode: str, batch: int | None, img_size: int, steps: int, rows: int, between_timm: bool
) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from davit import create_model
    from davit.bench import _make_step, load_timm_weights, timm_counterpart

    train = mode == "train"
    net = create_model(model).train(train)
    x = torch.randn(batch or (8 if train else 16), 3, img_size, img_size)
    step, _ = _make_step(net, x, mode, torch.float32, torch.device("cpu"), net)
    other: Callable[[], object] = lambda: None  # noqa: E731
    if between_timm:
        peer = timm_counterpart(model, net.num_classes).train(train)
        load_timm_weights(net, peer)
        other, _ = _make_step(peer, x, mode, torch.float32, torch.device("cpu"), peer)
    for _ in range(2):
        other()
        step()
    gemms: dict[tuple[str, str], list[float]] = {}  # (op, shapes) -> [seconds, flops, calls]
    rest: dict[str, list[float]] = {}  # op -> [seconds, calls]

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            dt = time.perf_counter() - t
            name = str(func)
            flops = gemm_flops(name, args, out)
            if flops is None:
                acc = rest.setdefault(name, [0.0, 0])
                acc[0] += dt
                acc[1] += 1
            else:
                shapes = " ".join(str(tuple(a.shape)) for a in args[:3] if isinstance(a, torch.Tensor))
                acc = gemms.setdefault((name, shapes), [0.0, 0, 0])
                acc[0] += dt
                acc[1] += flops
                acc[2] += 1
            return out

    plain = []
    for _ in range(steps):
        other()
        with Timed():
            step()
        other()
        t = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t)
    plain_ms = statistics.median(plain) * 1e3
    g_time = sum(v[0] for v in gemms.values()) / steps * 1e3
    g_flops = sum(v[1] for v in gemms.values()) / steps
    r_time = sum(v[0] for v in rest.values()) / steps * 1e3
    print(
        f"{model} {mode} b{x.shape[0]} {img_size} px, {torch.get_num_threads()} threads, {steps} timed steps"
        f"{' (timm between)' if between_timm else ''}: plain step {plain_ms:.0f} ms (median); GEMMs "
        f"{g_time:.1f} ms, {g_flops / 1e9:.2f} GFLOP at {g_flops / g_time / 1e6:.1f} GFLOP/s; other "
        f"dispatched ops {r_time:.1f} ms; not seen by the dispatcher {plain_ms - g_time - r_time:.1f} ms"
    )
    print(f"{'ms/step':>8s} {'GFLOP/s':>8s} {'calls':>5s}  op and operand shapes")
    for (name, shapes), (sec, flops, calls) in sorted(gemms.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{sec / steps * 1e3:8.1f} {flops / sec / 1e9:8.1f} {calls // steps:5d}  {name} {shapes}")
    print(f"{'ms/step':>8s} {'':8s} {'calls':>5s}  other ops")
    for name, (sec, calls) in sorted(rest.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{sec / steps * 1e3:8.1f} {'':8s} {calls // steps:5d}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = ("classify", "segment", "vs-timm", "vs-floor", "gemm-rates")
    ap.add_argument("--task", choices=tasks, default="classify")
    ap.add_argument("--model", default="davit_tiny", help="vs-timm, vs-floor, gemm-rates: the variant")
    ap.add_argument("--img-size", type=int, default=224, help="vs-timm, vs-floor, gemm-rates: the input size")
    ap.add_argument(
        "--mode", choices=("train", "infer"), default="train", help="vs-floor, gemm-rates: the step"
    )
    ap.add_argument("-b", "--batch-size", type=int, help="default: the demo's (64 classify, 16 segment)")
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores (the demos' default)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round and profiled")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--by-shape", action="store_true", help="the top input shapes of the heaviest ops")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument(
        "--compile", action="store_true", help="--task vs-floor: ours compiled as `davit bench --compile`"
    )
    ap.add_argument(
        "--between-timm", action="store_true", help="--task gemm-rates: timm's step before each of ours'"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.task == "vs-floor":
        compare_with_floor(
            args.model,
            args.mode,
            args.batch_size,
            args.img_size,
            args.rounds,
            args.steps,
            args.rows,
            args.compile,
        )
        return
    if args.task == "gemm-rates":
        gemm_rates(
            args.model, args.mode, args.batch_size, args.img_size, args.steps, args.rows, args.between_timm
        )
        return
    if args.task == "vs-timm":
        compare_with_timm(args.model, args.batch_size or 8, args.img_size, args.rounds, args.steps, args.rows)
        return
    batch = args.batch_size or (64 if args.task == "classify" else 16)
    step = (classify_step if args.task == "classify" else segment_step)(batch)
    for _ in range(args.steps):
        step()
    times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append((time.perf_counter() - t) / args.steps * 1000)
    print(
        f"{args.task}, batch {batch}, {torch.get_num_threads()} threads: median "
        f"{statistics.median(times):.1f} ms per step (rounds: {', '.join(f'{t:.1f}' for t in times)})"
    )
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.by_shape:
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
        rows = prof.key_averages(group_by_input_shape=True)
        for op in ops:
            mine = sorted((e for e in rows if e.key == op.key), key=lambda e: -e.self_cpu_time_total)[:5]
            for e in mine:
                per_step = e.self_cpu_time_total / 1000 / args.steps
                print(f"{op.key:40s} {per_step:7.2f} ms/step  x{e.count // args.steps}  {e.input_shapes}")


if __name__ == "__main__":
    main()
