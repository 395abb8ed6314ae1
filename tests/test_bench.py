"""`davit bench` end to end at tiny sizes. Timings are never asserted: benchmarks/ measures speed."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
import torch

from davit import create_model
from davit.bench import (
    _compile,
    load_timm_weights,
    matmul_peak_tflops,
    run_bench,
    step_memory,
    timm_counterpart,
)
from davit.cli import build_parser, main
from davit.compile_cache import code_version_pass

CPU = torch.device("cpu")
# tiny work, one thread: the CI machine is small and shared
QUICK = "--device cpu --repeats 1 --warmup 1 --threads 1 --peak-n 128"


def test_bench_both_modes_writes_json(tmp_path, capsys):
    out = tmp_path / "new" / "b.json"  # a missing folder is created, as davit export does
    rc = main(f"bench --model davit_atto --mode both --img-size 16 -b 2 {QUICK} --json {out}".split())
    assert rc == 0
    rep = json.loads(out.read_text())
    for k in ("model", "img_size", "dtype", "device", "torch", "cpu", "date", "command", "loadavg"):
        assert rep[k] is not None, k
    assert rep["model"] == "davit_atto" and rep["img_size"] == 16 and rep["matmul_peak_tflops"] > 0
    assert [r["mode"] for r in rep["results"]] == ["infer", "train"]
    inf, tr = rep["results"]
    for r in (inf, tr):
        assert r["impl"] == "ours" and r["batch_size"] == 2 and len(r["times_ms"]) == 1
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["frac_peak"] > 0
        assert r["peak_mem_mb"] == pytest.approx(r["state_mb"] + r["step_peak_mb"])
    # counted FLOPs: the backward costs twice the forward
    assert tr["gflop_per_img"] / inf["gflop_per_img"] == pytest.approx(3.0, rel=0.02)
    # training state = weights + two AdamW moments (gradients are allocated by the step)
    assert 2.9 < tr["state_mb"] / inf["state_mb"] < 3.1
    assert tr["step_peak_mb"] > tr["state_mb"] / 3  # at least the gradients
    assert tr["step_peak_mb"] > inf["step_peak_mb"] > 0  # saved activations vs transient ones
    assert "ours train eager" in capsys.readouterr().out
    assert rep["malloc"].startswith("glibc malloc: ")  # both models time under the same davit.alloc setting
    assert rep["infer_slice_tokens"] == 3136  # the model's default, recorded with the results
    assert [p.name for p in out.parent.iterdir()] == ["b.json"]  # no temporary file left beside it


def test_bench_checks_json_path_before_running(tmp_path, capsys):
    """A bad --json path is an error before any timing, not after minutes of it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    for bad, why in [(tmp_path, "is a folder"), (blocker / "b.json", "cannot create the folder")]:
        assert main(f"bench --model davit_atto --img-size 16 -b 2 {QUICK} --json {bad}".split()) == 2
        out, err = capsys.readouterr()
        assert why in err and "nothing ran" in err, err
        assert "img/s" not in out
    assert blocker.read_text() == "kept"


def test_bench_failed_json_write_keeps_old_file_and_prints_results(tmp_path, capsys, monkeypatch):
    """If writing --json fails at the end (disk full), the results go to stdout and a file already there
    is left as it was."""
    out = tmp_path / "b.json"
    out.write_text("old results")

    def disk_full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    assert main(f"bench --model davit_atto --img-size 16 -b 2 {QUICK} --json {out}".split()) == 2
    printed, err = capsys.readouterr()
    assert "No space left on device" in err and "printed above" in err, err
    assert out.read_text() == "old results"
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]  # the partial temporary file is removed
    rep = json.loads(printed[re.search(r"^\{$", printed, re.M).start() :])
    assert rep["model"] == "davit_atto" and rep["results"][0]["img_per_s"] > 0


def test_infer_slices_sets_ours_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "s.json"
    args = f"bench --model davit_atto --mode infer --img-size 16 -b 2 {QUICK} --no-memory --infer-slices 0"
    assert main(f"{args} --json {out}".split()) == 0
    rep = json.loads(out.read_text())
    assert rep["infer_slice_tokens"] == 0
    text = capsys.readouterr().out
    assert "ours' eager CPU inference: each stage on the whole batch" in text
    # which GEMM library inference uses here, by CPU (davit.layers.fused.default_inference_onednn_gemms)
    from davit.layers import fused

    gemms = "oneDNN, fused" if fused.inference_onednn_gemms_enabled() else "MKL's GEMMs"
    assert f"ours' CPU inference linears: {gemms}" in text
    assert rep["onednn_inference_gemms"] is fused.inference_onednn_gemms_enabled()


def test_compiled_inference_bench_says_how_ours_runs(tmp_path, capsys, monkeypatch):
    """`davit bench --compile` in inference: the compiled step runs and the line says which compiled CPU path
    ours takes (the chunked oneDNN ops where compiled inference uses oneDNN, inductor's graph otherwise)."""
    from davit.layers import fused

    monkeypatch.setattr(fused, "_ONEDNN_COMPILED_INFERENCE", True)
    out = tmp_path / "c.json"
    args = f"bench --model davit_atto --mode infer --img-size 32 -b 2 {QUICK} --no-memory --compile"
    assert main(f"{args} --json {out}".split()) == 0
    rep = json.loads(out.read_text())
    (res,) = rep["results"]
    assert rep["compile"] == "default" and res["flavour"] == "compiled(default)" and res["img_per_s"] > 0
    text = capsys.readouterr().out
    how = "ours' compiled CPU inference: norms with MLPs and attentions as opaque oneDNN ops on chunks of"
    assert how in text
    assert "ours infer compiled(default)" in text


def test_freezing_compiles_frozen_inference_and_is_recorded(tmp_path, capsys, monkeypatch):
    """`--freezing`: inductor's freezing option for the compiled models, really applied (weights folded and
    prepacked: passing the option to torch.compile alone froze nothing); the run says so in its flavour."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    counters.clear()
    seen = {}
    real = torch.compile

    def spy(model, **kw):
        seen.update(kw, global_freezing=inductor_config.freezing)
        return real(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    out = tmp_path / "f.json"
    args = f"bench --model davit_atto --mode infer --img-size 32 -b 2 {QUICK} --no-memory --compile"
    assert main(f"{args} --freezing --json {out}".split()) == 0
    seen["options"].pop("post_grad_custom_post_pass")  # davit.compile_cache's, in every compile
    assert seen["options"] == {"freezing": True} and "mode" not in seen
    assert seen["global_freezing"] is True  # inductor's global flag too: dynamo reads it when it traces
    # inductor packs a linear's or convolution's weight for oneDNN only where it is a frozen constant
    packed = {k: v for k, v in counters["inductor"].items() if k.endswith("weight_pack_matcher_count")}
    assert sum(packed.values()) > 0, f"nothing frozen: {dict(counters['inductor'])}"
    assert inductor_config.freezing is False  # the global flag is restored after the run
    rep = json.loads(out.read_text())
    assert rep["freezing"] is True
    (res,) = rep["results"]
    assert res["flavour"] == "compiled(default, frozen)" and res["img_per_s"] > 0
    assert "ours infer compiled(default, frozen)" in capsys.readouterr().out


def test_freezing_keeps_the_compile_mode_options(monkeypatch):
    # torch.compile takes a mode or options, not both: the mode's own options go with freezing
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    _compile(torch.nn.Identity(), "reduce-overhead", True, "batch", freezing=True)
    version = seen["options"].pop("post_grad_custom_post_pass")  # davit.compile_cache's, in every compile
    assert seen == {"fullgraph": True, "options": {"triton.cudagraphs": True, "freezing": True}}
    assert version.uuid() == code_version_pass().uuid()
    seen.clear()
    _compile(torch.nn.Identity(), "reduce-overhead", True, "batch")
    seen["options"].pop("post_grad_custom_post_pass")
    assert seen == {"fullgraph": True, "options": {"triton.cudagraphs": True}}
    seen.clear()
    _compile(torch.nn.Identity(), "default", True, "batch")
    seen["options"].pop("post_grad_custom_post_pass")
    assert seen == {"fullgraph": True, "options": {}}


@pytest.mark.parametrize("extra", ["--mode infer", "--mode train --compile", "--mode both --compile"])
def test_freezing_needs_compiled_inference(extra):
    args = build_parser().parse_args(f"bench --model davit_atto {extra} --freezing {QUICK}".split())
    with pytest.raises(ValueError, match="use it with --compile and --mode infer"):
        run_bench(args)


def test_vs_timm_prints_ratio_and_agrees(tmp_path, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "t.json"
    args = f"bench --model davit_tiny --mode infer --img-size 64 -b 1 {QUICK} --vs-timm --no-memory"
    assert main(f"{args} --json {out}".split()) == 0
    text = capsys.readouterr().out
    assert "ratio ours/timm infer eager: " in text and "median of 1)" in text
    rep = json.loads(out.read_text())
    assert rep["agreement_max_abs_diff"] <= 1e-4
    assert [r["impl"] for r in rep["results"]] == ["ours", "timm"]
    (ratio,) = rep["ratios"]
    assert ratio["ratio"] == pytest.approx(ratio["ours"] / ratio["timm"])
    (ours, timm) = rep["results"]
    assert ratio["round_ratios"] == pytest.approx([timm["times_ms"][0] / ours["times_ms"][0]])


def test_vs_timm_reports_the_spread_of_the_round_ratios(capsys):
    """Interleaved rounds pair up: each round's ratio is printed as a range and kept in the JSON."""
    pytest.importorskip("timm")
    argv = f"bench --model davit_tiny --img-size 32 -b 1 {QUICK} --repeats 3 --vs-timm --no-memory"
    args = build_parser().parse_args(argv.split())
    rep = run_bench(args)
    (ratio,) = rep["ratios"]
    ours, timm = rep["results"]
    rounds = [b / a for a, b in zip(ours["times_ms"], timm["times_ms"])]
    assert len(rounds) == 3 and ratio["round_ratios"] == pytest.approx(rounds)
    # with an odd number of rounds the ratio of the medians lies within the per-round ratios' range (if it
    # exceeded their max M, timm's time would be below M * ours' median, hence below its own median, in more
    # than half the rounds)
    assert min(rounds) * (1 - 1e-9) <= ratio["ratio"] <= max(rounds) * (1 + 1e-9)
    assert f"rounds {min(rounds):.2f}-{max(rounds):.2f}x" in capsys.readouterr().out


def test_gemm_floor_is_timed_in_the_same_rounds(capsys):
    """--gemm-floor: a third candidate, the GEMMs alone, timed in the rounds, reported beside the models."""
    pytest.importorskip("timm")
    argv = (
        f"bench --model davit_tiny --img-size 32 -b 1 --mode both {QUICK} --repeats 3 --vs-timm --gemm-floor"
    )
    rep = run_bench(build_parser().parse_args(argv.split()))
    assert [(r["impl"], r["mode"]) for r in rep["results"]] == [
        ("ours", "infer"),
        ("timm", "infer"),
        ("ours", "train"),
        ("timm", "train"),
    ]
    infer, train = rep["gemm_floor"]
    assert (infer["mode"], train["mode"]) == ("infer", "train")
    assert (infer["calls"], train["calls"]) == (53, 155)
    for floor, (ours, timm) in zip((infer, train), (rep["results"][:2], rep["results"][2:])):
        assert len(floor["times_ms"]) == 3 and floor["step_ms"] == pytest.approx(sorted(floor["times_ms"])[1])
        assert floor["ours_above_ms"] == pytest.approx(ours["step_ms"] - floor["step_ms"])
        assert floor["timm_over_floor"] == pytest.approx(timm["step_ms"] / floor["step_ms"])
        assert floor["gflop_per_s"] == pytest.approx(floor["gflop"] / floor["step_ms"] * 1e3)
    out = capsys.readouterr().out
    assert "GEMM floor infer: " in out and "GEMM floor train: " in out and "the most any port" in out


def test_load_timm_weights_maps_florence_block_names():
    ours = create_model("davit_atto", channel_attn_v2=True)
    src = create_model("davit_atto", channel_attn_v2=True)

    def timm_fl_name(k: str) -> str:  # timm's *_fl towers name the two blocks of a pair
        k = re.sub(r"(\.blocks\.\d+)\.0\.", r"\1.spatial_block.", k)
        return re.sub(r"(\.blocks\.\d+)\.1\.", r"\1.channel_block.", k)

    renamed = {timm_fl_name(k): v for k, v in src.state_dict().items()}
    assert any(".spatial_block." in k for k in renamed) and any(".channel_block." in k for k in renamed)

    class Peer(torch.nn.Module):
        def state_dict(self, *a, **kw):
            return renamed

    load_timm_weights(ours, Peer())
    for k, v in src.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_no_timm_counterpart_is_a_clear_error():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="no timm counterpart"):
        timm_counterpart("davit_atto", 10)


def test_step_memory_sees_a_known_allocation():
    def step():
        a = torch.ones(2**21)  # 8 MiB, freed on return
        return float(a.sum())

    peak = step_memory(step, CPU)
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_matmul_peak_is_positive():
    assert matmul_peak_tflops(torch.float32, CPU, n=64, repeats=1) > 0


def test_onnxruntime_backend_needs_fp32_inference():
    argv = f"bench --model davit_atto --backend onnxruntime --mode train {QUICK}".split()
    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match="fp32 inference only"):
        run_bench(args)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("--infer-slices -5", "--infer-slices must be >= 0"),
        ("--device tpu", "not a device name: use cpu, cuda"),
        ("--device meta", "davit bench times cpu or cuda"),
    ],
)
def test_bad_bench_arguments_are_clear_errors(extra, message):
    args = build_parser().parse_args(f"bench --model davit_atto {QUICK} {extra}".split())
    with pytest.raises(ValueError, match=message):
        run_bench(args)


@pytest.mark.parametrize("flag", ["-b", "--img-size", "--iters", "--threads", "--peak-n"])
def test_a_zero_size_is_refused_not_read_as_the_default(flag, capsys):
    with pytest.raises(SystemExit) as e:  # refused by the argument's type, before anything runs
        build_parser().parse_args(f"bench --model davit_atto {flag} 0 {QUICK}".split())
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(rf"argument \S*{flag}\S*: must be >= 1, got 0", err), err


def test_packed_inference_weights_count_as_state(tmp_path, monkeypatch):
    """With packed inference weights on, ours' state includes their copies (fused.packed_weight)."""
    from davit.layers import fused

    if not fused._MKLDNN:
        pytest.skip("no oneDNN in this PyTorch build")
    states = {}
    for on in (False, True):
        monkeypatch.setattr(fused, "_PACKED_WEIGHTS", on)
        out = tmp_path / f"p{on}.json"
        args = f"bench --model davit_atto --mode infer --img-size 32 -b 2 {QUICK} --json {out}"
        assert main(args.split()) == 0
        (res,) = json.loads(out.read_text())["results"]
        states[on] = res["state_mb"]
        assert json.loads(out.read_text())["packed_inference_weights"] is on
    # davit_atto's linear weights up to PACK_MAX_ELEMENTS: a few MB of copies
    assert states[True] - states[False] > 0.5, states


def test_window_attention_line_says_which_kernel_and_why(monkeypatch, fake_kernel_library):
    """`davit bench` names the kernel ours' CPU inference attends windows with, and why it is torch's."""
    from davit import bench
    from davit.layers import native

    try:
        native.set_native_kernels(False)
        assert bench._window_attention_kind() == (
            "torch's SDPA, convolution and matmuls (native kernels turned off)"
        )
        native.set_native_kernels(True)
        monkeypatch.setattr(native, "native_library", lambda: None)
        monkeypatch.setattr(native, "_error", "no C++ compiler found (set CXX)\nmore")
        assert bench._window_attention_kind() == (
            "torch's SDPA, convolution and matmuls "
            "(native kernels not available: no C++ compiler found (set CXX))"
        )
        monkeypatch.setattr(native, "_error", None)
        assert bench._window_attention_kind().endswith("(native kernels not available: no reason given)")
        # the default on a library built for neither AVX-512 nor AVX2: off, and the line says why and how to
        # run them
        monkeypatch.undo()
        monkeypatch.delenv("DAVIT_NATIVE_KERNELS", raising=False)
        monkeypatch.setattr(native, "_loaded_library", lambda: fake_kernel_library(0))
        native.set_native_kernels(None)
        assert bench._window_attention_kind() == (
            "torch's SDPA, convolution and matmuls (native kernels built for neither AVX-512 nor AVX2 "
            "(unmeasured there); DAVIT_NATIVE_KERNELS=1 runs them)"
        )
    finally:
        native.set_native_kernels(None)

