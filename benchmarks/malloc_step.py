"""What glibc's malloc settings cost a CPU training step: ``davit.alloc.tune_malloc`` against the defaults.

    .venv/bin/python benchmarks/malloc_step.py                       # davit_tiny, 224 px, batch 8
    .venv/bin/python benchmarks/malloc_step.py -b 32 --rounds 3

Each round starts one fresh process per setting, alternating (default, tuned, default, tuned, ...), since
malloc's state is per process; each process times ``--steps`` training steps (forward, cross-entropy,
backward, fused AdamW) after two warm-up steps and reports its median step time, the minor page faults and
the system CPU time per step (``getrusage``). The summary is the median over rounds per setting and the
median of the per-pair ratios of the step times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def child(model: str, batch: int, img: int, steps: int, tuned: bool) -> dict:
    import resource
    import time

    import torch

    from davit import create_model
    from davit.alloc import tune_malloc

    line = tune_malloc() if tuned else "glibc malloc: defaults"
    torch.manual_seed(0)
    m = create_model(model).train()
    x = torch.randn(batch, 3, img, img)
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
    p.add_argument("--rounds", type=int, default=3, help="(default, tuned) process pairs")
    p.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        r = child(a.model, a.batch_size, a.img_size, a.steps, a.child == "tuned")
        print("RESULT " + json.dumps(r), flush=True)
        return
    res: dict[str, list[dict]] = {"default": [], "tuned": []}
    for i in range(a.rounds):
        for setting in res:
            # glibc's own defaults in the default child (no MALLOC_* variables, tune_malloc not called); the
            # tuned child calls tune_malloc, which nothing in the environment switches off
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
    print(res["tuned"][0]["malloc"])
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0] if f != "malloc"} for k, v in res.items()}
    for k, v in med.items():
        print(
            f"median {k:7s} step {v['step_ms']:7.0f} ms  minor faults/step {v['minflt_per_step']:9.0f}  "
            f"system {v['sys_s_per_step']:.3f} s/step  max RSS {v['maxrss_mb']:.0f} MB"
        )
    # each pair ran minutes apart at most: its ratio is less exposed to the machine's drifts than the medians
    pairs = [d["step_ms"] / t["step_ms"] for d, t in zip(res["default"], res["tuned"])]
    each = ", ".join(f"{r:.2f}" for r in pairs)
    print(
        f"{a.model} b{a.batch_size} {a.img_size} px: tuned step {statistics.median(pairs):.2f}x as fast as "
        f"the defaults (median of {a.rounds} process pairs, each ratio: {each}; "
        f"{a.steps} steps per process)"
    )


if __name__ == "__main__":
    main()
