#!/usr/bin/env bash
# GPU check, no network needed: the throughput table for wave50@256 on CUDA, a short real training of
# Magnetic Tile at the paper's settings with its AUROCs, and torch.compile on/off. About 8 minutes.
#
# The GPU machine has PyTorch, torchvision, scikit-learn, scipy, tqdm and Pillow but not PyWavelets
# (faiss is optional: without it scoring uses the torch k-NN on the GPU). Fetch the wheel where pip
# works, for the GPU machine's Python (3.12 here):
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#         -d wheels pywavelets
# then, from the repository root, with the data beside it:
#     bash benchmarks/gpu_check.sh [DATA_ROOT] [MINUTES]          # results in $OUT or results/gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${1:-../shared/datasets}
MINUTES=${2:-8}
OUT=${OUT:-results/gpu_check}
WHEELS=${WHEELS:-wheels}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ! "$PY" -c "import pywt" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m benchmarks.gpu_check --data-root "$DATA_ROOT" --minutes "$MINUTES" --out "$OUT" "${@:3}"
