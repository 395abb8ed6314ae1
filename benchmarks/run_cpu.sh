#!/usr/bin/env bash
# CPU speed tables of docs/benchmarks.md: fp32, ours vs timm with identical weights, interleaved in one process.
#
#   benchmarks/run_cpu.sh [OUT_DIR]        full run (~30-60 min on 2 cores; run on a quiet machine)
#   QUICK=1 benchmarks/run_cpu.sh /tmp/q   smoke test of every code path at tiny sizes (~minutes)
# env: RUNS (regex of run names, default all), REPEATS (default 5), THREADS (default: all cores), DAVIT (default .venv/bin/davit)
# Writes OUT_DIR/<run>.json and .log, and OUT_DIR/table.md (the markdown block to paste into docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/cpu-$(date -u +%Y%m%d-%H%M)}
DAVIT=${DAVIT:-.venv/bin/davit}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
COMMON=(--device cpu --repeats "${REPEATS:-5}" --warmup 2 --threads "${THREADS:-$(nproc)}")
if [[ -n "${QUICK:-}" ]]; then  # same code paths, tiny work
    COMMON=(--device cpu --repeats 1 --warmup 1 --threads 1 --peak-n 512)
    S224=(--img-size 64) S768=(--img-size 96) BI=(-b 2) BT=(-b 1) B1=(-b 1)
else
    S224=(--img-size 224) S768=(--img-size 768) BI=(-b 16) BT=(-b 8) B1=(-b 1)
fi

run() {  # run NAME ARGS...: one `davit bench` invocation, JSON + log kept
    local name=$1; shift
    [[ $name =~ ${RUNS:-.} ]] || return 0  # RUNS=regex selects runs, e.g. RUNS='eager|onnx'
    echo "== $name: $DAVIT bench $* ${COMMON[*]}" >&2
    "$DAVIT" bench "$@" "${COMMON[@]}" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
}

{ echo "lscpu: $(lscpu | grep 'Model name' | sed 's/  */ /g')"; echo "nproc: $(nproc)"; uptime; } > "$OUT/machine.txt"

# davit_tiny, the headline: inference batch 16 and training step batch 8, eager and compiled
# (with the GEMM floor: the linears' and convolutions' GEMMs alone, timed in the same rounds)
run 01_tiny_infer_eager     --model davit_tiny --mode infer "${S224[@]}" "${BI[@]}" --vs-timm --gemm-floor
run 02_tiny_infer_compiled  --model davit_tiny --mode infer "${S224[@]}" "${BI[@]}" --vs-timm --compile --gemm-floor
run 03_tiny_train_eager     --model davit_tiny --mode train "${S224[@]}" "${BT[@]}" --vs-timm --gemm-floor
run 04_tiny_train_compiled  --model davit_tiny --mode train "${S224[@]}" "${BT[@]}" --vs-timm --compile --gemm-floor
# the model family at 224, eager inference
run 05_small_infer_eager    --model davit_small --mode infer "${S224[@]}" "${BI[@]}" --vs-timm
run 06_base_infer_eager     --model davit_base --mode infer "${S224[@]}" "${BI[@]}" --vs-timm
# Florence-2 base vision tower at its 768 px input, one image
run 07_base_fl_768_eager    --model davit_base_fl --mode infer "${S768[@]}" "${B1[@]}" --vs-timm
# onnxruntime (ours exported with a dynamic batch axis) against timm eager
run 08_tiny_onnxruntime     --model davit_tiny --mode infer "${S224[@]}" "${BI[@]}" --vs-timm --backend onnxruntime

"$PY" benchmarks/report.py "$OUT"/0*.json --title "CPU, fp32" > "$OUT/table.md"
echo "wrote $OUT/table.md" >&2
