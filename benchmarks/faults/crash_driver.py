"""Crash driver: kill `davit train` at random moments, resume with `--resume auto`, check nothing is lost.

usage: python benchmarks/faults/crash_driver.py [--task classify|segment|detect] [--trials 20] [--quick]
                                                [--torchrun] [--spawn] [--json F] [--doc F]

--task segment / detect drive `davit segment train` / `davit detect train` (UperNet / Mask R-CNN on a few
tiny scenes built in the work folder) the same way: they checkpoint at every `eval_interval` iterations and
resume when the same command is run again on the same --out.

One uninterrupted reference run, then per trial a fresh run that is killed (SIGKILL at a random step, or the
instant a checkpoint's data/sidecar temporary file appears, or between the data file's rename and its sidecar;
SIGTERM/SIGINT at a random step), inspected, and resumed to the end. Checked per trial: a valid checkpoint is
found whenever one had been completed, steps lost <= the checkpoint interval (0 for SIGTERM/SIGINT, which must
save first), no committed checkpoint is damaged, and the final weights equal the reference run's
(max abs diff).
With --torchrun, a 2-process gloo run has one rank SIGKILLed: the time until every process has exited is
measured, and the run is resumed under torchrun. Linux only (reads /proc for the ranks' pids).

Each single-process run is a child forked from the driver, which has imported torch, timm and davit once: a
fresh `python -m davit train` spends ~5 s of its ~12 s importing them. The child is still a process of its own
(own pid and session, killed by real signals, writing its files with the same code) and exits as
`python -m davit` does. --spawn starts a fresh interpreter per run instead.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

from davit.train.checkpoint import CheckpointError, find_latest_valid, verify_checkpoint
from davit.train.logging import read_metrics

INTERVAL = 2  # --checkpoint-every-steps
TRAIN = [
    "--model", "davit_atto",
    "--model-kwargs",
    '{"depths":[1,1,1,1],"embed_dims":[16,32,64,128],"num_heads":[1,1,2,4],"window_size":4}',
    "--dataset", "fashion-mnist", "--num-classes", "10", "--in-chans", "1", "--img-size", "16",
    "--simple-aug",
    "--train-samples", "48", "--val-samples", "16", "-b", "8", "-j", "0", "--epochs", "2",
    "--warmup-epochs", "0", "--cooldown-epochs", "0", "--seed", "7", "--device", "cpu", "--threads", "1",
    "--checkpoint-every-steps", str(INTERVAL), "--keep-last", "2", "--progress", "none", "--no-tensorboard",
    "--log-interval", "1",
]  # fmt: skip
TOTAL_STEPS = 12  # 48 images / batch 8 x 2 epochs
_CK = re.compile(r"ckpt-(\d+)\.pt$")

# the dense tasks: 8 tiny training scenes, batch 2 -> 4 iterations per epoch, 12 in all; a checkpoint (after
# an evaluation on the 2 held-out scenes) every INTERVAL iterations, as --checkpoint-every-steps above
_DENSE_SETS = ["batch_size=2", "workers=0", "threads=1", "time_limit_min=null", "log_interval=1",
               f"eval_interval={INTERVAL}", "eval_batch_size=2", "keep_checkpoints=2"]  # fmt: skip
DENSE = {
    "segment": ["--preset", "scenes-upernet-demo", "--progress", "none", "--set", *_DENSE_SETS,
                f"iters={TOTAL_STEPS}", "crop_size=48", "scale=[48,48]", "channels=8", "aux_channels=8"],
    "detect": ["--preset", "scenes-maskrcnn-demo", "--progress", "none", "--set", *_DENSE_SETS,
               "epochs=3", "min_sizes=[48]", "max_size=48"],
}  # fmt: skip
TASK = "classify"  # --task
SCENES: Path | None = None  # the dense tasks' data, built once per driver run


SPAWN = False  # --spawn: a fresh interpreter per run instead of a forked child
# what `davit train` imports (the bulk of a fresh process's start-up), imported once so children inherit it
PRELOAD = ("davit.cli", "davit.train.cli", "davit.train.trainer", "davit.data", "timm.scheduler")
PRELOAD_DENSE = ("davit.tasks.cli", "davit.tasks.engine", "davit.tasks.detection", "davit.tasks.segmentation")
ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _cmd(out: Path, exp: str, resume: bool, nproc: int = 1) -> list[str]:
    head = [sys.executable, "-m", "davit"]
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "davit"]  # fmt: skip
    if TASK != "classify":  # the run folder is --out itself; the same command resumes from its checkpoints
        # batch_size is global; on CPU each rank's BatchNorm in the UperNet heads needs 2 images
        more = ["batch_size=4"] if TASK == "segment" and nproc > 1 else []
        return head + [TASK, "train", "--data", str(SCENES), "--out", str(out / exp), *DENSE[TASK], *more]
    return (
        head
        + ["train", *TRAIN, "--output", str(out), "--experiment", exp]
        + (["--resume", "auto"] if resume else [])
    )


def _ckpt_dir(run: Path) -> Path:
    return run / ("checkpoints" if TASK == "classify" else "ckpt")


def _start(cmd: list[str], log: Path) -> subprocess.Popen | Forked:
    if not SPAWN and cmd[1:3] == ["-m", "davit"]:
        return Forked(cmd[3:], log)
    return subprocess.Popen(
        cmd,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **ENV},
        start_new_session=True,
    )


class Forked:
    """``davit ARGV`` in a child forked from this process, logging to ``log``; the part of Popen's interface
    the driver uses (pid, poll, wait, send_signal)."""

    def __init__(self, argv: list[str], log: Path) -> None:
        for name in PRELOAD + (PRELOAD_DENSE if TASK != "classify" else ()):
            importlib.import_module(name)
        if "matplotlib.pyplot" not in sys.modules:  # for the end-of-run report, with the backend it selects
            import matplotlib

            matplotlib.use("Agg")
            importlib.import_module("matplotlib.pyplot")
        sys.stdout.flush()
        sys.stderr.flush()
        self.args, self.returncode = argv, None
        self.pid = os.fork()
        if self.pid == 0:
            _child(argv, log)  # never returns

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        t0 = time.time()
        while self.poll() is None:
            if timeout is not None and time.time() - t0 > timeout:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


def _child(argv: list[str], log: Path) -> None:
    """The forked child: a process like `python -m davit ARGV` started with the driver's modules loaded."""
    code = 1
    try:
        os.setsid()  # its own session and process group, as Popen(start_new_session=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdout, sys.stderr = (
            io.TextIOWrapper(io.FileIO(f, "w", closefd=False), write_through=True) for f in (1, 2)
        )
        os.environ.update(ENV)
        # nothing of the driver's (or a test runner's) process state: default signal handlers, no exit
        # handlers or log handlers of its own
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        atexit._clear()
        for h in logging.root.handlers[:]:
            logging.root.removeHandler(h)
        # GNU OpenMP is not fork-safe: a forked child may hang in a parallel region once the parent has used
        # a pool of threads, unless it runs one thread (the runs here ask for --threads 1 anyway)
        torch.set_num_threads(1)
        sys.argv = ["davit", *argv]
        from davit.cli import main

        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _logged_step(run: Path) -> int:
    """Highest training step written to metrics.jsonl (a step is logged right after it is applied)."""
    recs = read_metrics(run / "metrics.jsonl")  # skips a line torn by the kill
    return max((int(r.get("step", 0)) for r in recs if r.get("kind") == "train"), default=0)


def _remaining_s(run: Path) -> float | None:
    """The run's expected time to its last step, from the pace of the steps it logged (None: too few yet)."""
    recs = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train" and "time" in r]
    if len(recs) < 2 or recs[-1]["step"] <= recs[0]["step"]:
        return None
    per_step = (recs[-1]["time"] - recs[0]["time"]) / (recs[-1]["step"] - recs[0]["step"])
    return max(0.0, (TOTAL_STEPS - recs[-1]["step"]) * per_step)


def _wait_step(p: subprocess.Popen, run: Path, k: int, timeout: float = 300) -> bool:
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if k <= 0 or _logged_step(run) >= k:
            return True
        time.sleep(0.02)
    return False


def _poll_for(p: subprocess.Popen, ck: Path, what: str, timeout: float = 300) -> bool:
    """Spin until the checkpoint folder shows ``what``; True if seen while the process still ran."""
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        try:
            names = os.listdir(ck)
        except FileNotFoundError:
            names = []
        if what == "data_tmp" and any(n.startswith(".ckpt-") and ".pt.tmp-" in n for n in names):
            return True
        if what == "sidecar_tmp" and any(n.startswith(".ckpt-") and ".sha256.tmp-" in n for n in names):
            return True
        if what == "renamed_no_sidecar" and any(_CK.match(n) and n + ".sha256" not in names for n in names):
            return True
    return False


def _inspect(ck: Path) -> dict:
    out = {"valid": [], "damaged_committed": [], "incomplete": [], "tmp_left": 0}
    if not ck.is_dir():
        return out
    names = set(os.listdir(ck))
    for n in sorted(names):
        if ".tmp-" in n:
            out["tmp_left"] += 1
        m = _CK.match(n)
        if not m:
            continue
        try:
            verify_checkpoint(ck / n)
            out["valid"].append(int(m.group(1)))
        except CheckpointError:
            # a data file with a sidecar that does not match = a committed checkpoint damaged (a lost file);
            # no sidecar = the kill fell between the two renames (never committed, skipped by design)
            (out["damaged_committed"] if n + ".sha256" in names else out["incomplete"]).append(
                int(m.group(1))
            )
    return out


def _resumed_step(log: Path) -> int:
    # `davit train`: "resumed from F: epoch E, step S"; the dense tasks: "resumed from F at iteration S/N"
    pat = r"resumed from \S+(?:: epoch \d+, step | at iteration )(\d+)"
    m = re.search(pat, log.read_text(errors="replace"))
    return int(m.group(1)) if m else 0


def _max_diff(a: Path, b: Path) -> float:
    sa, sb = load_file(str(a)), load_file(str(b))
    if sa.keys() != sb.keys():
        return float("inf")
    return max(float((sa[k].double() - sb[k].double()).abs().max()) if sa[k].numel() else 0.0 for k in sa)


def _finish(out: Path, exp: str, nproc: int = 1) -> tuple[int, int, float]:
    log = out / f"{exp}.resume.log"
    t0 = time.time()
    p = _start(_cmd(out, exp, True, nproc), log)
    rc = p.wait(timeout=900)
    return rc, _resumed_step(log), time.time() - t0


def trial(i: int, mode: str, out: Path, ref: Path, rng: random.Random, tries: int = 4) -> dict:
    """One trial; a signal that did not land while training ran (a checkpoint write that the poll missed
    because it took < 1 ms, or a run that ended first: on a fast CPU the quick runs' remaining steps take less
    than the random kill's delay) is tried again on a fresh run, up to ``tries`` times (attempts are
    recorded)."""
    for attempt in range(1, tries + 1):
        rec = _trial(f"t{i:02d}-{mode}-a{attempt}", i, mode, out, ref, rng)
        if rec["hit"]:
            break
    return {**rec, "attempts": attempt}


def _trial(exp: str, i: int, mode: str, out: Path, ref: Path, rng: random.Random) -> dict:
    run = out / exp
    ck = _ckpt_dir(run)
    k = rng.randint(0, TOTAL_STEPS - 1)  # wait for this many logged steps first (0: still starting up)
    p = _start(_cmd(out, exp, False), out / f"{exp}.log")
    rec: dict = {"trial": i, "mode": mode, "after_step": k}
    if _wait_step(p, run, k):
        if mode == "kill_random":
            # within the run's expected remaining time (at most 0.8 s): on a fast CPU the last steps take
            # less than that, and a delay drawn from the whole 0.8 s would mostly land after the run ended
            left = _remaining_s(run)
            time.sleep(rng.uniform(0, 0.8 if left is None else min(0.8, 0.9 * left)))
            hit = p.poll() is None
        elif mode in ("kill_ckpt_data", "kill_ckpt_sidecar", "kill_between_renames"):
            what = {"kill_ckpt_data": "data_tmp", "kill_ckpt_sidecar": "sidecar_tmp"}.get(
                mode, "renamed_no_sidecar"
            )
            hit = _poll_for(p, ck, what)
        else:
            hit = p.poll() is None
        sig = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}.get(mode, signal.SIGKILL)
        t_sig = time.time()
        if hit:
            p.send_signal(sig)
    else:
        hit, sig, t_sig = False, signal.SIGKILL, time.time()
    try:
        rc = p.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # our own process group: a graceful stop that hung
        rc = p.wait()
        rec["hung"] = True
    rec.update(hit=hit, rc=rc, exit_s=round(time.time() - t_sig, 2))
    logged = _logged_step(run)
    state = _inspect(ck)
    latest = find_latest_valid(ck) if ck.is_dir() else None
    latest_step = int(_CK.match(latest.name).group(1)) if latest is not None else 0
    rec.update(
        logged_step=logged,
        valid_ckpts=state["valid"],
        files_lost=len(state["damaged_committed"]),
        incomplete_left=len(state["incomplete"]),
        tmp_left=state["tmp_left"],
        latest_valid=latest_step,
    )
    rc2, resumed, t_res = _finish(out, exp)
    rec.update(resume_rc=rc2, resumed_step=resumed, steps_lost=logged - resumed, resume_s=round(t_res, 1))
    final = run / "model.safetensors"
    rec["max_abs_diff"] = _max_diff(final, ref) if final.exists() else None
    graceful = sig in (signal.SIGTERM, signal.SIGINT)
    rec["ok"] = bool(
        rc2 == 0
        and rec["files_lost"] == 0
        and rec["max_abs_diff"] == 0.0
        and resumed == latest_step
        # every checkpoint completed before the kill is found: step s's save ends before step s+1 is logged
        and latest_step >= ((logged - 1) // INTERVAL) * INTERVAL
        and rec["steps_lost"] <= (0 if graceful and hit else INTERVAL)
        and not rec.get("hung")
    )
    return rec


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(st.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def torchrun_trial(out: Path, rng: random.Random) -> dict:
    exp = "torchrun-kill-rank1"
    run = out / exp
    p = _start(_cmd(out, exp, False, nproc=2), out / f"{exp}.log")
    # `davit train`'s -b is per process, so 2 ranks take 6 steps; the dense tasks' batch_size is global: 12
    k = rng.randint(1, (TOTAL_STEPS // 2 if TASK == "classify" else TOTAL_STEPS) - 1)
    rec: dict = {"mode": "torchrun_kill_rank", "after_step": k}
    if not _wait_step(p, run, k):
        return {**rec, "ok": False, "error": "run ended before the kill"}
    ranks = _children(p.pid)
    victim = max(ranks)  # the later-started worker: rank 1 in practice; either way one rank dies
    t0 = time.time()
    os.kill(victim, signal.SIGKILL)
    try:
        rc = p.wait(timeout=300)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        rc, hung = p.wait(), True
    end_s = time.time() - t0
    left = [r for r in ranks if os.path.exists(f"/proc/{r}") and "zombie" not in _state(r)]
    logged = _logged_step(run)
    rc2, resumed, t_res = _finish(out, exp, nproc=2)
    rec.update(
        ranks=len(ranks), torchrun_rc=rc, hung=hung, all_exited_s=round(end_s, 2), ranks_left=len(left),
        logged_step=logged, resumed_step=resumed, steps_lost=logged - resumed, resume_rc=rc2,
        resume_s=round(t_res, 1), finished=(run / "model.safetensors").exists(),
    )  # fmt: skip
    rec["ok"] = bool(not hung and not left and rc2 == 0 and rec["finished"] and rec["steps_lost"] <= INTERVAL)
    return rec


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/status").read().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def summarize(results: list[dict], tr: dict | None, wall: float, args: argparse.Namespace) -> dict:
    kills = [r for r in results if r["hit"]]
    s = {
        "command": " ".join(["python", "benchmarks/faults/crash_driver.py", *sys.argv[1:]]),
        "task": TASK,
        "train_flags": " ".join(TRAIN if TASK == "classify" else DENSE[TASK]),
        "total_steps": TOTAL_STEPS,
        "checkpoint_interval": INTERVAL,
        "trials": len(results),
        "signals_delivered": len(kills),
        "survived": sum(r["ok"] for r in results),
        "by_mode": {
            m: {
                "trials": sum(r["mode"] == m for r in results),
                "delivered": sum(r["mode"] == m for r in kills),
                "ok": sum(r["ok"] for r in results if r["mode"] == m),
            }
            for m in dict.fromkeys(r["mode"] for r in results)
        },  # fmt: skip
        "max_steps_lost": max((r["steps_lost"] for r in results), default=0),
        "total_steps_lost": sum(r["steps_lost"] for r in results),
        "files_lost": sum(r["files_lost"] for r in results),
        "incomplete_left": sum(r["incomplete_left"] for r in results),
        "tmp_left": sum(r["tmp_left"] for r in results),
        "max_abs_weight_diff": max((r["max_abs_diff"] or 0.0) for r in results) if results else None,
        "graceful_exit_s": [r["exit_s"] for r in results if r["mode"] in ("sigterm", "sigint") and r["hit"]],
        "torchrun": tr,
        "wall_s": round(wall, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    s["all_ok"] = s["survived"] == s["trials"] and (tr is None or tr["ok"])
    return s


def render(s: dict) -> str:
    lines = [
        f"Measured {s['date']} ({s['machine']}, torch {s['torch']}), {s['wall_s']} s wall:",
        "",
        f"    {s['command']}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| trials (each: interrupt, inspect, `--resume auto` to the end) | {s['trials']} |",
        f"| signals delivered while training ran | {s['signals_delivered']} |",
        f"| trials that passed every check | {s['survived']} / {s['trials']} |",
        f"| steps lost, max / total (checkpoint interval {s['checkpoint_interval']}) | "
        f"{s['max_steps_lost']} / {s['total_steps_lost']} |",
        f"| committed checkpoints damaged (files lost) | {s['files_lost']} |",
        f"| half-written files left (skipped: no sidecar / `.tmp-`) | {s['incomplete_left']} / "
        f"{s['tmp_left']} |",
        f"| final weights vs uninterrupted run, max abs diff | {s['max_abs_weight_diff']} |",
        f"| SIGTERM/SIGINT: signal to exit (s) | {', '.join(map(str, s['graceful_exit_s'])) or '-'} |",
        "",
        "| mode | trials | signal delivered | passed |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {v['trials']} | {v['delivered']} | {v['ok']} |" for m, v in s["by_mode"].items()]
    if s["torchrun"]:
        t = s["torchrun"]
        lines += [
            "",
            f"torchrun, 2 gloo ranks, one SIGKILLed after step {t.get('after_step')}: every process gone "
            f"{t.get('all_exited_s')} s later (hung: {t.get('hung')}, ranks left: {t.get('ranks_left')}), "
            f"resumed under torchrun from step {t.get('resumed_step')} (steps lost {t.get('steps_lost')}), "
            f"finished: {t.get('finished')}.",
        ]
    return "\n".join(lines)


def update_doc(doc: Path, text: str) -> None:
    tag = "crash-driver" if TASK == "classify" else f"crash-driver-{TASK}"  # one block per task
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    src = doc.read_text() if doc.exists() else f"{begin}\n{end}\n"
    if begin not in src:
        src += f"\n{begin}\n{end}\n"
    a, rest = src.split(begin, 1)
    _, b = rest.split(end, 1)
    doc.write_text(f"{a}{begin}\n{text}\n{end}{b}")


MODES = ["kill_random", "kill_ckpt_data", "kill_ckpt_sidecar", "kill_between_renames", "sigterm", "sigint"]
WEIGHTS = [8, 4, 3, 3, 1, 1]  # 20 trials: 8 random kills, 10 kills timed on a checkpoint write, 2 graceful


def plan(n: int) -> list[str]:
    if n <= len(MODES):
        return [
            "kill_random",
            "kill_ckpt_data",
            "sigterm",
            "kill_ckpt_sidecar",
            "sigint",
            "kill_between_renames",
        ][:n]
    per = [max(1, round(w * n / sum(WEIGHTS))) for w in WEIGHTS]
    per[0] += n - sum(per)
    return [m for m, c in zip(MODES, per) for _ in range(c)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("classify", "segment", "detect"), default="classify")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="3 trials (random kill, kill mid-write, SIGTERM)")
    ap.add_argument("--torchrun", action="store_true", help="also the 2-process kill-one-rank trial")
    ap.add_argument("--spawn", action="store_true", help="a fresh interpreter per run (default: fork)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the figures and every trial here")
    ap.add_argument("--doc", default=None, help="replace the crash-driver block of this markdown file")
    args = ap.parse_args(argv)
    global SPAWN, TASK, SCENES
    SPAWN, TASK = args.spawn, args.task
    n = 3 if args.quick else args.trials
    rng = random.Random(args.seed)
    out = Path(args.workdir or tempfile.mkdtemp(prefix="davit-crash-"))
    out.mkdir(parents=True, exist_ok=True)
    if TASK != "classify":
        from davit.tasks.scenes import build_scenes

        SCENES = out / "scenes"
        if not (SCENES / "meta.json").exists():
            build_scenes(SCENES, num_train=8, num_val=2, size=48, items=(1, 2), item_frac=(0.3, 0.45), seed=5)
    t0 = time.time()
    p = _start(_cmd(out, "reference", False), out / "reference.log")
    if p.wait() != 0:
        print((out / "reference.log").read_text()[-3000:], file=sys.stderr)
        return 2
    ref = out / "reference" / "model.safetensors"
    tr = torchrun_trial(out, rng) if args.torchrun else None
    if tr:
        print(json.dumps(tr), flush=True)
    modes = plan(n)
    rng.shuffle(modes)
    results = []
    for i, mode in enumerate(modes):
        r = trial(i, mode, out, ref, rng)
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.json:  # partial figures survive an interrupted driver
            part = summarize(results, tr, time.time() - t0, args)
            Path(args.json).write_text(
                json.dumps({**part, "partial": True, "trials_detail": results}, indent=2)
            )
    s = summarize(results, tr, time.time() - t0, args)
    s["trials_detail"] = results
    print(render(s))
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2))
    if args.doc:
        update_doc(Path(args.doc), render(s))
    if not args.workdir:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if s["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
