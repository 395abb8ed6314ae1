#!/usr/bin/env bash
# Short real training runs on a GPU, as issues 3 and 5 ask: davit_tiny with the official recipes' presets at
# their resolutions, on data that is here (Fashion-MNIST upsampled to 224 px RGB; the scenes of `davit data
# scenes`, which Mask R-CNN's transform scales to the 480-800 px short side and UperNet crops at 512 px).
# Reports training img/s and peak GPU memory (metrics.jsonl: img_per_s, max_mem_gb) and that bf16 + compile work.
#
#   benchmarks/run_gpu_train.sh [OUT_DIR]                    on a CUDA machine (~15 min)
#   DEVICE=cpu QUICK=1 benchmarks/run_gpu_train.sh /tmp/gt   smoke test of the same commands on a CPU (tiny sizes)
# env: RUNS (regex of run names, default all), DAVIT (default .venv/bin/davit; a command, e.g. "python3 -m
# davit"), PY (default .venv/bin/python), FMNIST (folder of the Fashion-MNIST IDX files, default the Debian
# package's), RUN_TIMEOUT and DEADLINE (benchmarks/run_lib.sh), and the lengths CLS_STEPS (300), SCENES (2000
# training scenes), DET_EPOCHS (2), SEG_ITERS (300); benchmarks/device_run.sh sets them for one device call
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-train-$(date -u +%Y%m%d-%H%M)}
read -ra DAVIT <<< "${DAVIT:-.venv/bin/davit}"
read -ra PY <<< "${PY:-.venv/bin/python}"
DATA=()
[[ -n "${FMNIST:-}" ]] && DATA=(--data-dir "$FMNIST")
FM_ROOT=()
[[ -n "${FMNIST:-}" ]] && FM_ROOT=(--fmnist-root "$FMNIST")
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
# shellcheck source=benchmarks/run_lib.sh
source benchmarks/run_lib.sh
if [[ -n "${QUICK:-}" ]]; then
    CLS=(--img-size 64 -b 4 --max-steps 4 --train-samples 64 --val-samples 16 -j 0 --log-interval 1)
    SCENES=(--num-train 8 --num-val 2 --size 64)
    DET=(batch_size=2 epochs=1 "min_sizes=[64]" max_size=96 workers=0 log_interval=1 threads=2)
    SEG=(batch_size=2 iters=4 crop_size=64 "scale=[128,64]" workers=0 log_interval=1 eval_batch_size=1
         test_mode=whole threads=2)
else
    # 300 steps of 128: the compiled run's first step includes compilation (reported separately)
    CLS=(--img-size 224 -b 128 --max-steps "${CLS_STEPS:-300}" -j 8 --log-interval 10)
    SCENES=(--num-train "${SCENES:-2000}" --num-val 100 --size 256)
    # 2 img/GPU x 8 in the recipe; here one GPU holds 16
    DET=(batch_size=16 epochs="${DET_EPOCHS:-2}" workers=8 log_interval=10)
    SEG=(batch_size=16 iters="${SEG_ITERS:-300}" workers=8 log_interval=10)
fi

run() {
    local name=$1; shift
    [[ $name =~ ${RUNS:-.} ]] || return 0  # RUNS=regex selects runs, e.g. RUNS='cls'
    run_limited "$name" "$OUT/$name.log" "$@"
}

{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; lscpu | grep 'Model name'; uptime; } > "$OUT/machine.txt"

# issue 3: the imagenet preset (AdamW, cosine, RandAugment, mixup/cutmix, drop path 0.1) in bf16, eager and compiled
for flavour in eager compiled; do
    extra=()
    [[ $flavour == compiled ]] && extra=(--torchcompile)
    run "cls_$flavour" "${DAVIT[@]}" train --preset imagenet --model davit_tiny --dataset fashion-mnist --num-classes 10 \
        --in-chans 3 --amp --amp-dtype bfloat16 --device "$DEVICE" --progress plain --no-tensorboard \
        --output "$OUT" --experiment "cls_$flavour" "${DATA[@]}" "${CLS[@]}" "${extra[@]}"
done

# issue 5: the COCO Mask R-CNN 1x and ADE20K UperNet presets with davit_tiny on the scenes, bf16 autocast
[[ -f "$OUT/scenes/meta.json" ]] || "${DAVIT[@]}" data scenes --out "$OUT/scenes" "${SCENES[@]}" "${FM_ROOT[@]}"
run det "${DAVIT[@]}" detect train --preset coco-maskrcnn-1x --data "$OUT/scenes" --out "$OUT/det" --no-resume \
    --progress plain --set num_classes=11 amp=true device="$DEVICE" "${DET[@]}"
run seg "${DAVIT[@]}" segment train --preset ade20k-upernet-160k --data "$OUT/scenes" --out "$OUT/seg" --no-resume \
    --progress plain --set num_classes=11 reduce_zero_label=false amp=true device="$DEVICE" "${SEG[@]}"

"${PY[@]}" benchmarks/train_report.py "$OUT" > "$OUT/table.md"
cat "$OUT/table.md"
echo "wrote $OUT/table.md" >&2
