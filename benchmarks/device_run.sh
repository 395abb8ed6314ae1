#!/usr/bin/env bash
# The GPU checks of issues 3-5 sized for a lent device machine (one H100/H200; 15 minutes of device time per
# session, start-up included, at most 10 minutes per call, and the machine goes back after 30 s idle).
# Prepare here first (wheels and data the machine lacks), then call the device tool:
#
#   benchmarks/device_prepare.sh
#   device run: "LIMIT=240 bash benchmarks/device_run.sh eager /tmp/r; (cd /tmp/r && tar czf $OUT/e.tgz .)",
#               carry [".whl", ".devdata"], timeout_s 300
#   device run: the same with "LIMIT=480 ... compiled", timeout_s 540, at once (the machine is still warm)
#   (H200, session 22: eager 85 s before the CUDA tests were added, compiled 300 s before its profile; both
#   calls with a ~30 s start fit the 15 minutes; a part past its LIMIT skips its last steps, see run_lib.sh)
#   device run: "bash benchmarks/device_run.sh train", timeout_s 590, if device time is left
#
# (the tar: the tool returns at most 8 files from $OUT)
# eager:    the CUDA tests (tests/layers/test_norm.py, tests/test_devices.py), issue 4's eager inference
#           rows (benchmarks/run_gpu.sh 01 and 01b: davit_tiny bf16 at batch 256 against timm with identical
#           weights, 01b with DAVIT_TRITON_LAYERNORM=1) and where the eager steps go (profile_gpu.py).
# compiled: the compiled rows 04 (training at batch 128; its MFU column is the training target) and 02
#           (inference at batch 256), then a profile of compiled inference if time is left. bench = eager,
#           then compiled, in one call.
# train: issues 3 and 5's short real runs (benchmarks/run_gpu_train.sh, shortened): davit_tiny with the imagenet
#        preset at 224 px in bf16, eager and compiled; Mask R-CNN (coco-maskrcnn-1x) and UperNet
#        (ade20k-upernet-160k) on 256 px scenes at the recipes' resolutions; img/s and peak memory.
# Results go to $OUT (the device tool's return folder), else benchmarks/results/device; each part prints its
# table last; every run ends by LIMIT seconds (default 560) after the start, the last ones shortened or
# skipped if the first took long. On a CPU, a smoke test of the same paths:
#   DEVICE=cpu QUICK=1 PYTHON=.venv/bin/python benchmarks/device_run.sh bench /tmp/dev   (eager part: 40 s)
# where the GPU limits stop the compiled rows (inductor's first compile of a training step takes 3-4 minutes
# on 2 cores); the train part's four rows, compiled one included, end in ~6.5 minutes with
#   DEVICE=cpu QUICK=1 PYTHON=.venv/bin/python RUN_TIMEOUT=300 LIMIT=900 benchmarks/device_run.sh train /tmp/dev
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: device_run.sh bench|eager|compiled|train [OUT_DIR]}
DEST=${2:-${OUT:-benchmarks/results/device}}
PYTHON=${PYTHON:-python3}  # the device image's Python, which holds its torch
LIMIT=${LIMIT:-560}  # seconds this part may take: under the call's timeout_s (590), which would lose the tables
export DEADLINE=$(($(date +%s) + LIMIT))
mkdir -p "$DEST"
# the carried wheels, unless what they provide imports already (e.g. on this machine, for a smoke test)
if ! "$PYTHON" -c "import pycocotools, webdataset" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}  # this checkout's davit, not an installed one
export DAVIT="$PYTHON -m davit" PY="$PYTHON" DEVICE=${DEVICE:-cuda}
if [[ -d .devdata/fashion-mnist ]]; then export FMNIST=.devdata/fashion-mnist; fi

# what the machine is, and that davit imports and runs there, before spending minutes on it
"$PYTHON" - "$DEVICE" <<'EOF' 2>&1 | tee "$DEST/env_$PART.txt"
import sys, time, torch, torchvision
import davit
dev = sys.argv[1]
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, davit from {davit.__file__}")
if dev == "cuda":
    print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
m = davit.create_model("davit_tiny").to(dev).eval()
with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
    t = time.perf_counter()
    y = m(torch.randn(2, 3, 224, 224, device=dev))
print(f"davit_tiny bf16 forward: {tuple(y.shape)} in {time.perf_counter() - t:.2f} s (first call)")
# issue 4's numerics on this device: fast path vs reference path in true fp32 (no TF32), random weights
from davit.bench import full_fp32
x = torch.randn(4, 3, 224, 224, device=dev)
with torch.inference_mode(), full_fp32():
    fast = m(x)
    m.set_fast(False)
    ref = m(x)
    m.set_fast(True)
print(f"fast vs reference path, fp32 (no TF32): max abs diff {(fast - ref).abs().max().item():.2e} (target <= 1e-4)")
# the Triton layer norm (opt-in) against F.layer_norm in the whole model, bf16 autocast, random weights
from davit.layers.norm import set_triton_layer_norm, triton_available
if dev == "cuda" and triton_available():
    def logits(on):
        set_triton_layer_norm(on)
        with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16):
            return m(x).float()
    a, b = logits(True), logits(False)
    rel = ((a - b).norm() / b.norm()).item()
    same = (a.argmax(1) == b.argmax(1)).float().mean().item()
    print(f"bf16 logits, Triton layer norm vs F.layer_norm: relative diff {rel:.2e}, top-1 equal {same:.3f}")
EOF

eager_rows() {
    # the CUDA tests (the Triton layer norm is opt-in until they and row 01b have run on a GPU), issue 4's eager
    # inference rows against timm (seconds each: 01 plain, 01b with the Triton layer norm), then where both
    # eager steps go (profile_gpu.py, with the Triton layer norm)
    if "$PYTHON" -c "import pytest" 2> /dev/null; then
        timeout -k 5 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/layers/test_norm.py \
            tests/test_devices.py 2>&1 | tail -6 | tee "$DEST/tests_cuda.txt" || true
    fi
    mkdir -p "$DEST/bench"
    RUNS='^01' RUN_TIMEOUT=120 benchmarks/run_gpu.sh "$DEST/bench"
    if (($(date +%s) + 90 < DEADLINE)); then
        DAVIT_TRITON_LAYERNORM=1 timeout -k 5 60 "$PYTHON" benchmarks/profile_gpu.py --device "$DEVICE" \
            ${QUICK:+--img-size 64 --batch-infer 2 --batch-train 2 --steps 1} > "$DEST/bench/profile.txt" 2>&1 \
            || echo "== profile: exit status $?" >&2
        grep -A12 '^== ' "$DEST/bench/profile.txt" || true
    fi
}
compiled_rows() {
    # the compiled training row (the MFU target; inductor compiles both models' forward and backward
    # first), then compiled inference; each run_gpu.sh call re-writes table.md from every row so far
    RUNS='^04_' RUN_TIMEOUT=${RUN_TIMEOUT:-300} benchmarks/run_gpu.sh "$DEST/bench"
    RUNS='^02_' RUN_TIMEOUT=${RUN_TIMEOUT:-240} benchmarks/run_gpu.sh "$DEST/bench"
    # where compiled inference goes (inductor's kernels, both models; ~2 minutes with the compiles)
    if (($(date +%s) + 150 < DEADLINE)); then
        timeout -k 5 140 "$PYTHON" benchmarks/profile_gpu.py --device "$DEVICE" --compile --modes infer \
            ${QUICK:+--img-size 64 --batch-infer 2 --steps 1} > "$DEST/bench/profile_compiled.txt" 2>&1 \
            || echo "== compiled profile: exit status $?" >&2
        grep -A12 '^== ' "$DEST/bench/profile_compiled.txt" || true
    fi
}

case $PART in
    bench) eager_rows; compiled_rows ;;
    eager) eager_rows ;;  # a first short call (~2 min) that shows the code runs there, then:
    compiled) compiled_rows ;;
    train)
        CLS_STEPS=${CLS_STEPS:-150} SCENES=${SCENES:-600} DET_EPOCHS=${DET_EPOCHS:-1} SEG_ITERS=${SEG_ITERS:-200} \
            RUN_TIMEOUT=${RUN_TIMEOUT:-150} benchmarks/run_gpu_train.sh "$DEST/train"
        ;;
    *)
        echo "unknown part '$PART': use bench (= eager, then compiled) or train" >&2
        exit 2
        ;;
esac
