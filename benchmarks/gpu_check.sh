#!/usr/bin/env bash
# GPU check, no network needed: throughput table for wave50@256 on CUDA, then a short real training
# of Magnetic Tile at the paper's settings with its AUROCs. Fits in about 8 minutes on one H200.
#
# Prepare on a machine with internet (the GPU machine has torch, torchvision, scikit-learn, scipy,
# tqdm and Pillow, but not PyWavelets or faiss):
#     pip download --no-deps -d wheels pywavelets faiss-cpu
# then run from the repository root, with ../shared/datasets/magnetic_tile beside it:
#     bash benchmarks/gpu_check.sh [DATA_ROOT] [MINUTES_FOR_TRAINING]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${1:-../shared/datasets}
TRAIN_MINUTES=${2:-4}
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
python -c "import pywt" 2>/dev/null || pip install -q --no-index --find-links wheels pywavelets
python -c "import faiss" 2>/dev/null || pip install -q --no-index --find-links wheels faiss-cpu || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

# 1. Throughput: real epochs and real scoring runs.
python benchmarks/throughput.py --data-root "$DATA_ROOT" --configs wave50@256 --device cuda --epochs 3 \
    --scoring faiss,torch,coreset --work-dir runs/gpu_throughput --out "$OUT" 2>&1 | tail -n 8

# 2. A short real training at the paper's settings (wave50, 256 px, batch 32), as many epochs as fit.
IPS=$(python -c "import json;print(json.load(open('$OUT/throughput_cuda.json'))['rows'][0]['train img/s'])")
EPOCHS=$(python -c "n=762*3; print(max(1, int(float('$IPS') * 60 * $TRAIN_MINUTES / n)))")
echo "training $EPOCHS epochs (${TRAIN_MINUTES} min at ${IPS} img/s)"
python main.py --c magnetic_tile --data-root "$DATA_ROOT" --device cuda --e "$EPOCHS" \
    --ckpt-dir runs/gpu_paper --no-tensorboard --save-every 0 2>&1 | tail -n 2
for fusion in concatenation multiplication; do
    python "inference_${fusion}.py" --c magnetic_tile --data-root "$DATA_ROOT" --ckpt-dir runs/gpu_paper \
        --p magnetic_tile-wave50 --device cuda --no-pictures --out "$OUT/$fusion" 2>&1 | tail -n 1
done
echo "tables and results.json under $OUT/"
