"""Interleaved timing rounds shared by the A/B scripts (``switch_ab.py``, ``native_ab.py``, ...).

Each round runs every step ``calls`` times in turn (A A A, B B B, ...); a step's figure is the median over
rounds of its per-round median, so a slow spell of the machine hits every candidate alike. The order turns
by one step each round (A B C, B C A, C A B, ...), so that no step always runs first after another model's
(which may have evicted its weights from cache). Three copies of one compiled davit_tiny step, then timm's,
in a fixed order came out 894/852/807 and 763/741/720 ms first to last; rotated, 747/782/800 ms (9 rounds
each, Intel VM, session 32): between identical steps ~5 %, so on that VM smaller A/B differences mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from torch import nn

from davit import create_model
from davit.bench import load_timm_weights, timm_counterpart


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The A/B scripts' common options: variant, mode, batch, image size, rounds."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="davit_tiny")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=9)
    return p


def compile_caches_off() -> None:
    """Turn inductor's FX graph cache and AOTAutograd's cache off in this process, so every compiled model
    of an A/B compiles its own graphs: a switch read when the backward is traced leaves the forward graph,
    which those caches key on, unchanged, so the second model could get the first one's backward; and a
    cache filled under another ``ATEN_CPU_CAPABILITY`` could serve code for the wrong vector ISA
    (docs/benchmarks.md, session 51). Earlier sessions set ``TORCHINDUCTOR_FX_GRAPH_CACHE=0
    TORCHINDUCTOR_AUTOGRAD_CACHE=0`` by hand."""
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def cache_hits() -> int:
    """Inductor's FX graph cache and AOTAutograd's cache hits in this process so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def build(model_name: str, timm: bool) -> nn.Module | None:
    """A fresh model of ours, or timm's of the same variant with a fresh model of ours' weights; ``None``
    (and a line saying so) where timm is not installed or has no such variant."""
    model = create_model(model_name)
    if not timm:
        return model
    try:
        net = timm_counterpart(model_name, 1000, 3)
    except (RuntimeError, ValueError) as e:  # timm is not installed, or has no such variant
        print(f"{e}: its column is left out")
        return None
    load_timm_weights(model, net)
    return net


def under(setter: Callable[[bool], object], value: bool, step: Callable[[], object]) -> Callable[[], object]:
    """``step`` run with a module switch set (``setter(value)``, e.g. ``fused.set_opaque_convs``), the
    previous value restored after. Switches read while dynamo traces guard their graph, so each step runs
    under its own."""

    def run() -> object:
        previous = setter(value)
        try:
            return step()
        finally:
            setter(previous)  # type: ignore[arg-type]

    return run


def warm_up(name: str, step: Callable[[], object]) -> None:
    """Two untimed calls (the first compiles, where the step is compiled), the first one's time printed."""
    t = time.perf_counter()
    step()
    print(f"{name}: first call {time.perf_counter() - t:.1f} s", flush=True)
    step()


def interleaved_medians(
    steps: dict[str, Callable[[], object]],
    rounds: int,
    calls: int = 3,
    per_round: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Seconds per call of each step: the median over ``rounds`` of each round's median; prints each round.
    ``per_round``, where given, receives each step's per-round medians (for paired ratios)."""
    per_round = {} if per_round is None else per_round
    per_round.update({n: [] for n in steps})
    names = list(steps)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            step = steps[name]
            ts = []
            for _ in range(calls):
                t = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t)
            per_round[name].append(statistics.median(ts))
        line = ", ".join(f"{n} {v[-1] * 1e3:.0f} ms" for n, v in per_round.items())
        print(f"round {r}: {line}", flush=True)
    return {n: statistics.median(v) for n, v in per_round.items()}


def paired(per_round: dict[str, list[float]], a: str, b: str) -> str:
    """The median and quartiles of the per-round ratios ``b / a`` (how much longer b took than a in the same
    round), from :func:`interleaved_medians`' ``per_round``."""
    r = [y / x for x, y in zip(per_round[a], per_round[b], strict=True)]
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return f"median {statistics.median(r):.3f}x, quartiles {q[0]:.3f}-{q[2]:.3f}"


def print_summary(head: str, med: dict[str, float], base_name: str, rounds: int) -> None:
    """Each step's median and its speed relative to ``base_name``'s (left out where that step is missing)."""
    base = med.get(base_name)
    width = max(map(len, med)) + 2
    print(f"\n{head}, median of {rounds} rounds:")
    for name, m in med.items():
        rel = f", {base / m:.3f}x {base_name}" if base else ""
        print(f"  {name:{width}s} {m * 1e3:7.0f} ms{rel}")
