#!/usr/bin/env bash
# GPU speed tables of docs/benchmarks.md: bf16 (autocast), ours vs timm with identical weights, interleaved.
#
#   benchmarks/run_gpu.sh [OUT_DIR]                     on a CUDA machine
#   DEVICE=cpu QUICK=1 benchmarks/run_gpu.sh /tmp/g     smoke test of the same code paths on a CPU
# env: RUNS (regex of run names, default all), REPEATS (default 5), DEVICE (default cuda), DAVIT (default
# .venv/bin/davit; a command, e.g. "python3 -m davit"), PY (default .venv/bin/python), RUN_TIMEOUT (seconds per
# run) and DEADLINE (`date +%s` by which all runs end): see benchmarks/run_lib.sh
# MFU column = achieved FLOP/s (forward + backward, counted) / the bf16 matmul peak measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
read -ra DAVIT <<< "${DAVIT:-.venv/bin/davit}"
read -ra PY <<< "${PY:-.venv/bin/python}"
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
# shellcheck source=benchmarks/run_lib.sh
source benchmarks/run_lib.sh
COMMON=(--device "$DEVICE" --dtype bf16 --repeats "${REPEATS:-5}" --warmup 3 --peak-n 8192)
if [[ -n "${QUICK:-}" ]]; then
    COMMON=(--device "$DEVICE" --dtype bf16 --repeats 1 --warmup 1 --iters 1 --peak-n 256 --threads 1)
    S=(--img-size 64) BI=(-b 2) BT=(-b 2)
else
    S=(--img-size 224) BI=(-b 256) BT=(-b 128)
fi

run() {
    local name=$1; shift
    [[ $name =~ ${RUNS:-.} ]] || return 0  # RUNS=regex selects runs, e.g. RUNS='eager|onnx'
    run_limited "$name" "$OUT/$name.log" "${DAVIT[@]}" bench "$@" "${COMMON[@]}" --json "$OUT/$name.json"
}

{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; lscpu | grep 'Model name'; uptime; } > "$OUT/machine.txt"

run 01_tiny_infer_eager     --model davit_tiny --mode infer "${S[@]}" "${BI[@]}" --vs-timm
# the same with ours' Triton layer norm (opt-in until measured: src/davit/layers/norm.py)
DAVIT_TRITON_LAYERNORM=1 run 01b_tiny_infer_eager_triton_ln --model davit_tiny --mode infer "${S[@]}" "${BI[@]}" --vs-timm
run 02_tiny_infer_compiled  --model davit_tiny --mode infer "${S[@]}" "${BI[@]}" --vs-timm --compile --gemm-floor
run 03_tiny_train_eager     --model davit_tiny --mode train "${S[@]}" "${BT[@]}" --vs-timm
run 04_tiny_train_compiled  --model davit_tiny --mode train "${S[@]}" "${BT[@]}" --vs-timm --compile --gemm-floor
run 05_small_train_compiled --model davit_small --mode train "${S[@]}" "${BT[@]}" --vs-timm --compile
run 06_base_train_compiled  --model davit_base --mode train "${S[@]}" "${BT[@]}" --vs-timm --compile

shopt -s nullglob
results=("$OUT"/0*.json)
if (( ${#results[@]} )); then
    "${PY[@]}" benchmarks/report.py "${results[@]}" --title "GPU, bf16 autocast" > "$OUT/table.md"
    cat "$OUT/table.md"
    echo "wrote $OUT/table.md" >&2
else
    echo "no run finished: no table" >&2
fi
