"""Time and profile one training step of the CPU demos' models: where does an iteration go on this machine?

    .venv/bin/python benchmarks/profile_step.py --task classify            # the Fashion-MNIST demo's step
    .venv/bin/python benchmarks/profile_step.py --task segment --by-shape  # the UperNet demo's, per op shape
    .venv/bin/python benchmarks/profile_step.py --task vs-timm             # davit_tiny ours vs timm, per op
    .venv/bin/python benchmarks/profile_step.py --task vs-floor            # ours' step vs its GEMMs alone
    .venv/bin/python benchmarks/profile_step.py --task vs-floor --mode infer --compile  # compiled forward

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("classify", "segment", "vs-timm", "vs-floor"), default="classify")
    ap.add_argument("--model", default="davit_tiny", help="--task vs-timm / vs-floor: the variant")
    ap.add_argument("--img-size", type=int, default=224, help="--task vs-timm / vs-floor: the input size")
    ap.add_argument("--mode", choices=("train", "infer"), default="train", help="--task vs-floor: the step")
    ap.add_argument("-b", "--batch-size", type=int, help="default: the demo's (64 classify, 16 segment)")
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores (the demos' default)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round and profiled")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--by-shape", action="store_true", help="the top input shapes of the heaviest ops")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument(
        "--compile", action="store_true", help="--task vs-floor: ours compiled as `davit bench --compile`"
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
