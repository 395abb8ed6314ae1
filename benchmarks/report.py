"""Render `davit bench --json` files as one markdown block for docs/benchmarks.md.

usage: python benchmarks/report.py RESULT.json [...] [--title TEXT]
Each row is one (run, mode); the commands, machine, torch version, date and load are listed under the table.
"""

from __future__ import annotations

import argparse
import json


def _f(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def _sig(v: float | None) -> str:  # 3 significant digits: 0.0156 and 215 both readable
    return "–" if v is None else f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _linears_line(run: dict) -> list[str]:
    """Which GEMM library ours' CPU fp32 linears used (davit.layers.fused's defaults for the CPU, or the
    DAVIT_ONEDNN_* overrides): the same code picks different kernels on Intel and AMD. None for GPU runs and
    for files written before these fields existed."""
    keys = ("onednn_training_linears", "onednn_inference_gemms", "onednn_compiled_inference")
    if run.get("gpu") or not all(k in run for k in keys):
        return []
    train = "oneDNN" if run["onednn_training_linears"] else "F.linear (MKL)"
    infer = "oneDNN's fused kernels" if run["onednn_inference_gemms"] else "MKL, epilogues in place"
    if run.get("packed_inference_weights"):
        infer += ", small weights packed"
    comp = "the chunked opaque ops" if run["onednn_compiled_inference"] else "inductor's graph, F.linear"
    if run["onednn_compiled_inference"] and run.get("compiled_packed_weights"):
        comp += " with small weights packed"
    lines = [f"Ours' fp32 linears here: training {train}; inference {infer}; compiled inference {comp}."]
    if "native_window_attention" in run:
        kind = "davit's native kernels" if run["native_window_attention"] else "torch's SDPA and convolution"
        lines.append(
            "Ours' fp32 window attention (windows up to 12x12) and position encodings (inference and "
            f"training): {kind}."
        )
        if run.get("native_channel_attention"):
            lines.append("Ours' fp32 channel attention (inference and training): davit's native kernel.")
    return lines


def _floor_lines(runs: list[dict]) -> list[str]:
    """One bullet per (run, mode) timed with --gemm-floor: the floor and each model's step over it; timm's
    is the most any port with the same GEMMs could be ahead of it."""
    out = []
    for i, r in enumerate(runs, 1):
        for f in r.get("gemm_floor") or []:
            over = ", ".join(
                f"{impl} {f[impl + '_over_floor']:.2f}x it ({f[impl + '_above_ms']:+.0f} ms)"
                for impl in ("ours", "timm")
                if impl + "_over_floor" in f
            )
            out.append(
                f"- run {i}, {f['mode']}: {f['step_ms']:.1f} ms ({f['calls']} GEMMs, {f['gflop']:.1f} "
                f"GFLOP at {f['gflop_per_s']:.0f} GFLOP/s); {over}"
            )
    return out


def render(paths: list[str], title: str) -> str:
    runs = [json.load(open(p)) for p in paths]
    if not runs:
        raise SystemExit("no result files given")
    first = runs[0]
    hw = first.get("gpu") or f"{first['cpu']} ({first['cores']} cores)"
    lines = [
        f"### {title}",
        "",
        f"Machine: {hw}, {first['threads']} threads; torch {first['torch']}; {first['date']}.",
        "Throughput is the median of interleaved rounds (ours, timm, ours, timm, ...) in one process; "
        "GFLOP/s is achieved FLOPs (forward, or forward + backward for training) and its percentage of a "
        "square matmul timed "
        "in the same run; memory is model state + the step's peak allocation.",
        *_linears_line(first),
        "",
        "| run | model | px | mode | batch | ours | ours img/s | timm img/s | ours/timm "
        "| ours GFLOP/s (% matmul) "
        "| ours / timm peak MB | ours / timm compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        by = {}
        for res in r["results"]:
            by.setdefault(res["mode"], {})[res["impl"]] = res
        for mode, d in by.items():
            o, t = d["ours"], d.get("timm")
            ratio = next((x["ratio"] for x in r["ratios"] if x["mode"] == mode), None)
            comp = f"{o['compile_s']:.0f} / {t['compile_s']:.0f}" if t and r["compile"] else "–"
            mem = f"{_f(o['peak_mem_mb'], '.0f')} / {_f(t['peak_mem_mb'], '.0f') if t else '–'}"
            label = o["flavour"] + (" + Triton LN" if r.get("triton_layernorm") else "")
            if r.get("infer_slice_tokens") == 0 and mode == "infer":
                label += ", whole batch"  # --infer-slices 0: no batch slices in CPU inference
            lines.append(
                f"| {i} | {r['model']} | {r['img_size']} | {mode} {r['dtype']} | {o['batch_size']} "
                f"| {label} "
                f"| {_sig(o['img_per_s'])} | {_sig(t['img_per_s']) if t else '–'} "
                f"| {'**' + format(ratio, '.2f') + 'x**' if ratio else '–'} "
                f"| {o['tflops'] * 1e3:.1f} ({100 * o['frac_peak']:.0f}%) | {mem} | {comp} |"
            )
    floors = _floor_lines(runs)
    if floors:
        lines += [
            "",
            "GEMM floor (`--gemm-floor`: the linears' and dense convolutions' GEMMs alone, same rounds):",
            "",
        ]
        lines += floors
    lines += ["", "Commands (run number: command — date, 1/5/15-min load average, matmul peak):", ""]
    for i, r in enumerate(runs, 1):
        load = " ".join(r["loadavg"] or ["?"])
        agree = (
            ""
            if r["agreement_max_abs_diff"] is None
            else f", ours vs timm max abs diff {r['agreement_max_abs_diff']:.1e}"
        )
        lines.append(
            f"{i}. `{r['command']}` — {r['date']}, code {r.get('git') or '?'}, load {load}, "
            f"matmul {r['matmul_peak_tflops'] * 1e3:.0f} GFLOP/s "
            f"({r['dtype']}, n={r['matmul_peak_n']}){agree}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--title", default="Results")
    a = ap.parse_args()
    print(render(a.files, a.title), end="")


if __name__ == "__main__":
    main()
