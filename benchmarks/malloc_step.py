"""What the allocations cost a CPU step: glibc's malloc settings, and CPU inference's batch slices.

    .venv/bin/python benchmarks/malloc_step.py                       # davit_tiny, 224 px, batch 8
    .venv/bin/python benchmarks/malloc_step.py -b 32 --rounds 3
    .venv/bin/python benchmarks/malloc_step.py --compare slices -b 16 --rounds 3   # inference

``--compare malloc`` (default): a training step (forward, cross-entropy, backward, fused AdamW) with glibc's
defaults against ``davit.alloc.tune_malloc``. ``--compare slices``: an inference forward (eval,
``torch.inference_mode``, glibc's defaults in both) with every stage run on the whole batch
(``infer_chunk_tokens = 0``) against the default slices of ``davit.models.INFER_CHUNK_TOKENS`` tokens.
Each round starts one fresh process per setting, alternating (A, B, A, B, ...), since malloc's state is per
process; each process times ``--steps`` steps after two warm-up steps and reports its median step time, the
minor page faults and the system CPU time per step (``getrusage``) and its peak resident memory. The summary
is the median over rounds per setting and the median of the per-pair ratios of the step times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SETTINGS = {"malloc": ("default", "tuned"), "slices": ("whole", "sliced")}


def child(model: str, batch: int, img: int, steps: int, setting: str) -> dict:
    import resource
    import time

    import torch

    from davit import create_model
    from davit.alloc import tune_malloc

    line = tune_malloc() if setting == "tuned" else "glibc malloc: defaults"
    torch.manual_seed(0)
    m = create_model(model)
    x = torch.randn(batch, 3, img, img)
    if setting in SETTINGS["slices"]:
        m.eval()
        if setting == "whole":
            for stage in m.stages:
                stage.infer_chunk_tokens = 0

        def step() -> None:
            with torch.inference_mode():
                m(x)

    else:
        y = torch.randint(0, m.num_classes, (batch,))
        opt = torch.optim.AdamW(m.parameters(), fused=True)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    for _ in range(2):
        step()
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return dict(
        malloc=line,
        step_ms=statistics.median(times) * 1e3,
        minflt_per_step=(r1.ru_minflt - r0.ru_minflt) / steps,
        sys_s_per_step=(r1.ru_stime - r0.ru_stime) / steps,
        maxrss_mb=r1.ru_maxrss / 1024,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="davit_tiny")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--compare", choices=list(SETTINGS), default="malloc")
    p.add_argument("--rounds", type=int, default=3, help="process pairs (one per setting)")
    p.add_argument("--child", choices=[s for pair in SETTINGS.values() for s in pair], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        r = child(a.model, a.batch_size, a.img_size, a.steps, a.child)
        print("RESULT " + json.dumps(r), flush=True)
        return
    base, new = SETTINGS[a.compare]
    res: dict[str, list[dict]] = {base: [], new: []}
    for i in range(a.rounds):
        for setting in res:
            # glibc's own defaults in every child but the tuned one (no MALLOC_* variables, tune_malloc not
            # called); the tuned child calls tune_malloc, which nothing in the environment switches off
            skip = ("DAVIT_MALLOC_TUNING", "GLIBC_TUNABLES")
            env = {k: v for k, v in os.environ.items() if k not in skip and not k.startswith("MALLOC_")}
            cmd = [sys.executable, __file__, "--child", setting, "--model", a.model, "-b", str(a.batch_size)]
            cmd += ["--img-size", str(a.img_size), "--steps", str(a.steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"the {setting} child process failed:\n{proc.stderr[-3000:]}")
            out = proc.stdout
            r = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
            res[setting].append(r)
            print(
                f"round {i + 1} {setting:7s} step {r['step_ms']:7.0f} ms  minor faults/step "
                f"{r['minflt_per_step']:9.0f}  system {r['sys_s_per_step']:.3f} s/step  "
                f"max RSS {r['maxrss_mb']:.0f} MB",
                flush=True,
            )
    print(res[new][0]["malloc"])
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0] if f != "malloc"} for k, v in res.items()}
    for k, v in med.items():
        print(
            f"median {k:7s} step {v['step_ms']:7.0f} ms  minor faults/step {v['minflt_per_step']:9.0f}  "
            f"system {v['sys_s_per_step']:.3f} s/step  max RSS {v['maxrss_mb']:.0f} MB"
        )
    # each pair ran minutes apart at most: its ratio is less exposed to the machine's drifts than the medians
    pairs = [d["step_ms"] / t["step_ms"] for d, t in zip(res[base], res[new])]
    each = ", ".join(f"{r:.2f}" for r in pairs)
    what = "tuned step" if a.compare == "malloc" else "sliced inference"
    than = "the defaults" if a.compare == "malloc" else "the whole batch"
    print(
        f"{a.model} b{a.batch_size} {a.img_size} px: {what} {statistics.median(pairs):.2f}x as fast as "
        f"{than} (median of {a.rounds} process pairs, each ratio: {each}; "
        f"{a.steps} steps per process)"
    )


if __name__ == "__main__":
    main()
