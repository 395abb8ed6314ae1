#!/usr/bin/env bash
# Run HERE (where pip reaches PyPI) before the device calls of benchmarks/device_run.sh: the lent GPU machine
# reaches nothing, has torch/torchvision/timm but neither pycocotools nor webdataset (which `import davit`
# needs), and no Fashion-MNIST. This puts their wheels (for its Python 3.12) in .whl/ and the four IDX files
# in .devdata/fashion-mnist/ (~31 MB; both folders git-ignored), which the device calls carry.
#
#   benchmarks/device_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FM=${FMNIST_SRC:-/usr/share/datasets/fashion-mnist}
mkdir -p .whl .devdata/fashion-mnist
rm -f .whl/*.whl  # one version of each: two would stop the install there
# pycocotools' and webdataset's own needs (numpy, matplotlib, pyyaml) are on the machine; braceexpand is not
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pycocotools webdataset braceexpand
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [[ -f "$FM/$f" ]] || { echo "missing $FM/$f: install dataset-fashion-mnist or set FMNIST_SRC" >&2; exit 1; }
    cp -u "$FM/$f" .devdata/fashion-mnist/
done
ls -l .whl
du -sh .whl .devdata
