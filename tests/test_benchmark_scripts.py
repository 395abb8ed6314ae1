"""The scripts of benchmarks/ run end to end at tiny sizes (their timings are never asserted)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"


def _run(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--threads", "1", *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("task, batch", [("classify", "4"), ("segment", "2")])
def test_profile_step_times_and_profiles_the_demo_step(task, batch):
    out = _run("--task", task, "-b", batch, "--steps", "1", "--rounds", "2", "--rows", "5", "--by-shape")
    m = re.search(rf"{task}, batch {batch}, 1 threads: median ([\d.]+) ms per step", out)
    assert m and float(m.group(1)) > 0, out
    assert "Self CPU time total" in out
    # --by-shape: the heaviest ops with the shapes they ran on (the batch is the leading dimension somewhere)
    assert re.search(rf"ms/step  x\d+  \[\[{batch}, ", out), out


def test_malloc_step_alternates_fresh_processes_and_reports_faults():
    script = SCRIPT.parent / "malloc_step.py"
    args = ["--model", "davit_atto", "-b", "2", "--img-size", "32", "--steps", "1", "--rounds", "2"]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rounds = re.findall(r"round (\d) (default|tuned) +step +\d+ ms  minor faults/step +\d+", r.stdout)
    assert rounds == [("1", "default"), ("1", "tuned"), ("2", "default"), ("2", "tuned")], r.stdout
    summary = r"davit_atto b2 32 px: tuned step [\d.]+x as fast as the defaults \(median of 2"
    assert re.search(summary, r.stdout), r.stdout


def test_onednn_ab_interleaves_both_settings():
    """benchmarks/onednn_ab.py (and its shared rounds, ab_rounds.py): both settings timed in every round;
    a variant without a timm counterpart leaves timm's column out instead of failing."""
    script = SCRIPT.parent / "onednn_ab.py"
    args = ["--model", "davit_atto", "-b", "2", "--img-size", "32", "--rounds", "2"]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rounds = re.findall(r"round (\d): ours oneDNN \d+ ms, ours F.linear \d+ ms\n", r.stdout)
    assert rounds == ["0", "1"], r.stdout
    assert "davit_atto train eager, batch 2, 32 px, median of 2 rounds:" in r.stdout
    assert "its column is left out" in r.stdout
    cmd = [sys.executable, str(script), *args, "--mode", "infer"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "add --compile" in r.stderr


def test_native_ab_times_the_kernels_on_and_off():
    """benchmarks/native_ab.py: ours with the native kernels and with torch's ops in every round, and the
    paired per-round ratio; a variant without a timm counterpart leaves timm's column out."""
    script = SCRIPT.parent / "native_ab.py"
    args = ["--model", "davit_atto", "-b", "2", "--img-size", "32", "--rounds", "2"]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rounds = re.findall(r"round (\d): ours, native kernels \d+ ms, ours, torch's ops \d+ ms\n", r.stdout)
    assert rounds == ["0", "1"], r.stdout
    assert re.search(r"per-round torch's ops / native: median [\d.]+x, quartiles", r.stdout), r.stdout
    assert "its column is left out" in r.stdout


def test_native_ab_times_each_kernel_call_for_another_cpu_target(tmp_path):
    """benchmarks/native_ab.py --calls: each kernel against torch's ops on every block map of the model;
    --march builds the kernels for another target (here AVX2, which the library reports)."""
    script = SCRIPT.parent / "native_ab.py"
    args = ["--model", "davit_atto", "-b", "1", "--img-size", "56", "--rounds", "1", "--calls"]
    if platform.machine() in ("x86_64", "AMD64"):
        args += ["--march", "haswell"]
    env = {**os.environ, "DAVIT_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, str(script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    if "--march" in args:
        assert "(vectors of 256 bits)" in r.stdout, r.stdout
    row = r"  (window|channel) block \d+x\d+x\d+, ([a-z ]+): [\d.]+ vs [\d.]+ \([\d.]+x\)"
    assert set(re.findall(row, r.stdout)) >= {
        ("window", "layer norm"), ("window", "position encoding"), ("window", "window attention"),
        ("channel", "layer norm"), ("channel", "channel attention"),
    }, r.stdout  # fmt: skip


def test_switch_ab_times_a_switch_on_and_off():
    """benchmarks/switch_ab.py: ours with the switch on and off in every round, the paired per-round ratio,
    and the switch left as it was."""
    script = SCRIPT.parent / "switch_ab.py"
    args = ["--switch", "pos_enc", "--model", "davit_atto", "-b", "2", "--img-size", "32", "--rounds", "2"]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rounds = re.findall(r"round (\d): ours, pos_enc on \d+ ms, ours, pos_enc off \d+ ms\n", r.stdout)
    assert rounds == ["0", "1"], r.stdout
    assert re.search(r"per-round off / on: +median [\d.]+x, quartiles", r.stdout), r.stdout
    r = subprocess.run([sys.executable, str(script), "--switch", "nope"], capture_output=True, text=True)
    assert r.returncode != 0 and "invalid choice: 'nope'" in r.stderr


def test_kernels_ab_pairs_two_kernel_sources(tmp_path):
    """benchmarks/kernels_ab.py: ours with the current kernel library and with one built from ``--base`` in
    every round (here a copy of the current source, so the build is the cached one), the paired per-round
    ratio; a missing or absent ``--base`` is refused with what to give."""
    script = SCRIPT.parent / "kernels_ab.py"
    source = SCRIPT.parents[1] / "src" / "davit" / "csrc" / "cpu_kernels.cpp"
    base = tmp_path / "base.cpp"
    base.write_text(source.read_text())
    args = ["--model", "davit_atto", "-b", "2", "--img-size", "32", "--rounds", "2"]
    r = subprocess.run(
        [sys.executable, str(script), "--base", str(base), *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    name = "kernels vs base.cpp"
    rounds = re.findall(rf"round (\d): ours, {name} on \d+ ms, ours, {name} off \d+ ms\n", r.stdout)
    assert rounds == ["0", "1"], r.stdout
    assert re.search(r"per-round off / on: +median [\d.]+x, quartiles", r.stdout), r.stdout
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "needs --base PATH" in r.stderr
    missing = tmp_path / "none.cpp"
    r = subprocess.run(
        [sys.executable, str(script), "--base", str(missing)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "no such file" in r.stderr


def test_malloc_step_compares_inference_on_batch_slices():
    script = SCRIPT.parent / "malloc_step.py"
    args = ["--compare", "slices", "--model", "davit_atto", "-b", "2", "--img-size", "32", "--steps", "1"]
    r = subprocess.run(
        [sys.executable, str(script), *args, "--rounds", "1"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rounds = re.findall(r"round (\d) (whole|sliced) +step +\d+ ms  minor faults/step +\d+", r.stdout)
    assert rounds == [("1", "whole"), ("1", "sliced")], r.stdout
    summary = r"davit_atto b2 32 px: sliced inference [\d.]+x as fast as the whole batch \(median of 1"
    assert re.search(summary, r.stdout), r.stdout


def test_profile_step_vs_timm_lists_both_models_per_op():
    pytest.importorskip("timm")
    out = _run(
        "--task", "vs-timm", "--img-size", "64", "-b", "1", "--steps", "1", "--rounds", "2", "--rows", "8"
    )
    assert "davit_tiny b1 64 px forward + backward, 2 interleaved rounds" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("aten::")}
    # both models run their linears as matrix products: a positive time in each column
    gemm = rows.get("aten::mm") or rows.get("aten::addmm")
    assert gemm is not None and all(float(v) > 0 for v in gemm), out


def test_profile_step_vs_floor_lists_the_step_against_its_gemms():
    out = _run(
        "--task", "vs-floor", "--model", "davit_atto", "--img-size", "32", "-b", "2", "--steps", "1",
        "--rounds", "2", "--rows", "1000",  # every op: which ones make the top rows varies from run to run
    )  # fmt: skip
    assert "davit_atto train b2 32 px: ours' step vs its 131 GEMMs alone, 2 interleaved rounds" in out, out
    rows = {
        line.split()[0]: [float(v) for v in line.split()[1:]]
        for line in out.splitlines()
        if line.startswith("aten::")
    }
    # the replay runs the GEMMs and nothing of the rest: no GELU, no optimizer step in its column
    assert rows["aten::mm"][0] > 0 and rows["aten::mm"][1] > 0
    for op in ("aten::gelu_backward", "aten::_fused_adamw_"):
        step, floor, diff = rows[op]
        assert step > 0 and floor == 0.0 and diff == pytest.approx(step), (op, out)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_profile_step_gemm_rates_counts_the_steps_gemm_flops(mode):
    """--task gemm-rates: every GEMM of ours' step timed and counted; at 224 px (no padded windows) its FLOPs
    are the GEMM floor's, which counts them from the reference path's layers."""
    import torch

    from davit import create_model
    from davit.gemm_floor import GemmReplay, capture_model_gemms
    from davit.layers import native

    if native.native_library() is None:
        # torch's matmuls then run the channel attention: GEMMs too, which the floor does not count
        pytest.skip("no native kernels (no C++ compiler)")

    args = ("--task", "gemm-rates", "--model", "davit_atto", "--img-size", "224", "-b", "1", "--steps", "1")
    out = _run(*args, "--mode", mode)
    head = re.search(
        rf"davit_atto {mode} b1 224 px, 1 threads, 1 timed steps: plain step (\d+) ms \(median\); GEMMs "
        r"([\d.]+) ms, ([\d.]+) GFLOP at [\d.]+ GFLOP/s; other dispatched ops ([\d.]+) ms",
        out,
    )
    assert head, out
    train = mode == "train"
    net = create_model("davit_atto").train(train)
    floor = GemmReplay(capture_model_gemms(net, torch.randn(1, 3, 224, 224), train)).flops
    assert float(head.group(3)) == pytest.approx(floor / 1e9, abs=0.006), out
    if not train:
        return
    # the weight gradients are GEMM rows with a rate (the native kernel's, or oneDNN's or MKL's where the
    # kernel is not built for the CPU); the optimizer's update is one of the other ops
    wgrad = r"^ +[\d.]+ +[\d.]+ +\d+  (davit\.linear_weight_grad|aten\.convolution_backward|aten\.mm)\."
    assert re.search(wgrad, out, re.M), out
    assert re.search(r"^ +[\d.]+ +\d+  aten\._(fused_adamw_|foreach_\w+)\.", out, re.M), out


def test_profile_gpu_profiles_both_models_on_a_cpu():
    # the GPU profile script's code path, on a CPU (self CPU time instead of device time)
    pytest.importorskip("timm")
    args = ["--device", "cpu", "--dtype", "fp32", "--img-size", "32", "--batch-infer", "2"]
    args += ["--batch-train", "2"]
    r = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "profile_gpu.py"), *args, "--steps", "1", "--top", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    heads = re.findall(r"== (ours|timm) (infer|train) b2 fp32 eager: wall [\d.]+ ms/step", r.stdout)
    assert heads == [("ours", "infer"), ("timm", "infer"), ("ours", "train"), ("timm", "train")], r.stdout
    assert re.search(r"^aten::\w+ +[\d.]+ +[\d.]+% +[\d.]+$", r.stdout, re.M), r.stdout


RUN_LIB = SCRIPT.parent / "run_lib.sh"


def _run_limited(tmp_path: Path, env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    """benchmarks/run_lib.sh's run_limited on one command, as the GPU scripts call it."""
    log = tmp_path / "probe.log"
    script = f'set -euo pipefail; source "{RUN_LIB}"; run_limited probe "{log}" "$@"; echo after'
    return subprocess.run(
        ["bash", "-c", script, "bash", *command],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env},
    )


def test_run_limited_logs_a_command_and_goes_on(tmp_path):
    r = _run_limited(tmp_path, {}, "echo", "hello")
    assert r.returncode == 0 and r.stdout.splitlines() == ["hello", "after"], (r.stdout, r.stderr)
    assert (tmp_path / "probe.log").read_text() == "hello\n"


def test_run_limited_stops_a_run_past_its_timeout_and_the_script_goes_on(tmp_path):
    t = time.monotonic()
    r = _run_limited(tmp_path, {"RUN_TIMEOUT": "1"}, "sleep", "20")
    assert time.monotonic() - t < 15
    # under `set -e` a stopped run would end the caller; one device call must reach the next run and the table
    assert r.returncode == 0 and r.stdout.strip() == "after", (r.stdout, r.stderr)
    assert "== probe: exit status 124" in r.stderr


def test_run_limited_skips_a_run_when_the_deadline_is_near(tmp_path):
    r = _run_limited(tmp_path, {"DEADLINE": str(int(time.time()) + 10)}, "echo", "never")
    assert r.returncode == 0 and r.stdout.strip() == "after", (r.stdout, r.stderr)
    assert "== probe: skipped" in r.stderr and not (tmp_path / "probe.log").exists()
    # with time left, the deadline bounds the run like a timeout
    r = _run_limited(tmp_path, {"DEADLINE": str(int(time.time()) + 40)}, "echo", "ran")
    assert r.stdout.splitlines() == ["ran", "after"] and re.search(r"at most (39|40) s", r.stderr), r.stderr


def test_report_renders_bench_json_and_labels_whole_batch_runs(tmp_path):
    import torch

    from davit.cli import main

    quick = "--model davit_atto --mode infer --img-size 16 -b 2 --device cpu --repeats 1 --warmup 1"
    quick += " --threads 1 --peak-n 128 --no-memory"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    threads = torch.get_num_threads()  # --threads 1 sets the process's thread count
    try:
        assert main(f"bench {quick} --json {a}".split()) == 0
        assert main(f"bench {quick} --infer-slices 0 --gemm-floor --json {b}".split()) == 0
    finally:
        torch.set_num_threads(threads)
    script = SCRIPT.parent / "report.py"
    r = subprocess.run(
        [sys.executable, str(script), str(a), str(b), "--title", "T"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2, r.stdout
    assert "| eager |" in rows[0] and "| eager, whole batch |" in rows[1]
    # the kernels ours' linears used on this CPU (davit.layers.fused's settings), under the machine line
    from davit.layers import fused

    infer = "oneDNN's fused kernels" if fused.inference_onednn_gemms_enabled() else "MKL, epilogues in place"
    assert "Ours' fp32 linears here: training " in r.stdout and f"; inference {infer};" in r.stdout
    opaque = fused.onednn_compiled_inference_enabled()
    comp = "the chunked opaque ops" if opaque else "inductor's graph, F.linear"
    if opaque and fused.compiled_packed_weights_enabled():
        comp += " with small weights packed"
    assert f"; compiled inference {comp}." in r.stdout
    from davit.layers import native

    kind = "davit's native kernels" if native.native_library() is not None else "torch's SDPA and convolution"
    line = "Ours' fp32 window attention (windows up to 12x12) and position encodings (inference and training)"
    assert f"{line}: {kind}." in r.stdout
    assert json.loads(a.read_text())["native_window_attention"] is (native.native_library() is not None)
    # the GEMM floor of the run timed with it, and only that run's
    floor = json.loads(b.read_text())["gemm_floor"][0]
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("- run ")]
    assert line.startswith(f"- run 2, infer: {floor['step_ms']:.1f} ms ({floor['calls']} GEMMs")
    assert f"ours {floor['ours_over_floor']:.2f}x it" in line and "timm" not in line


def test_ab_rounds_turn_the_order_each_round(monkeypatch, capsys):
    """benchmarks/ab_rounds.py: every step runs ``calls`` times per round, and the order turns by one step a
    round, so that no step always runs first after another model's."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from ab_rounds import interleaved_medians

    calls: list[str] = []
    steps = {n: (lambda n=n: calls.append(n)) for n in "ABC"}
    med = interleaved_medians(steps, rounds=4, calls=2)
    assert calls == list("AABBCC" "BBCCAA" "CCAABB" "AABBCC")
    assert set(med) == set("ABC") and all(v >= 0 for v in med.values())
    assert capsys.readouterr().out.count("round ") == 4
    per: dict[str, list[float]] = {}
    interleaved_medians(steps, rounds=2, calls=1, per_round=per)
    assert set(per) == set("ABC") and all(len(v) == 2 for v in per.values())


def test_ab_rounds_under_sets_a_switch_for_one_step_only(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from ab_rounds import under

    state = {"on": False}

    def setter(value: bool) -> bool:
        previous, state["on"] = state["on"], value
        return previous

    seen: list[bool] = []
    run = under(setter, True, lambda: seen.append(state["on"]))
    run()
    assert seen == [True] and state["on"] is False


def test_ab_rounds_compile_caches_off(monkeypatch):
    """benchmarks/ab_rounds.py: the compiled A/B scripts turn inductor's FX graph cache and AOTAutograd's
    cache off, so each model compiles its own graphs; the hits so far are counted."""
    import torch._functorch.config
    import torch._inductor.config

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from ab_rounds import cache_hits, compile_caches_off

    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", True)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", True)
    compile_caches_off()
    assert torch._inductor.config.fx_graph_cache is False
    assert torch._functorch.config.enable_autograd_cache is False
    assert cache_hits() >= 0
