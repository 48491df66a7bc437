#!/usr/bin/env bash
# The frame / tile comparison of docs/results.md "Localisation at the defects' scale", on one GPU:
# wave18, 128 px, 20 epochs (the paper code's budget), 3 seeds run side by side, concatenation.
#
#   bash benchmarks/frames_gpu.sh OUT DATASET_FOLDER [DATASET_FOLDER ...]
#
# Variants (FRAME_VARIANTS, ';'-separated, overrides them): paper; best (squashed to 128 x 128);
# best scored at the auto frame (trained squashed); best trained on 128 px tiles of the auto frame
# and scored at it (exact bank, and certified coreset 0.1 / 0.05). Each seed's accuracy.json is
# copied to OUT/seedN.json every 15 s, so a run cut short keeps what finished. A machine
# without PyWavelets gets it from wheels in .whl/ (see benchmarks/gpu_check.sh for how to fetch one).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$1
shift
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import pywt" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/frames_site .whl/*.whl
    export PYTHONPATH=/tmp/frames_site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT" runs
DEFAULT_VARIANTS="paper;best;best-auto=best|--frame auto;tiles=best --frame auto|;tiles-c10=best --frame auto|--coreset 0.1;tiles-c05=best --frame auto|--coreset 0.05"
IFS=';' read -r -a VARIANTS <<<"${FRAME_VARIANTS:-$DEFAULT_VARIANTS}"
COMMON=(--datasets "$@" --arch wave18 --size 128 --e 20 --no-baseline --fusions concatenation
        --work-dir runs/frames --reference paper --variants "${VARIANTS[@]}")
copy_results() { for s in 0 1 2; do cp "runs/frames_out/seed$s/accuracy.json" "$OUT/seed$s.json" 2>/dev/null; done; }
PIDS=()
for seed in 0 1 2; do
    "$PY" -m benchmarks.accuracy "${COMMON[@]}" --seeds "$seed" --out "runs/frames_out/seed$seed" \
        >"$OUT/log$seed.txt" 2>&1 &
    PIDS+=($!)
done
(while sleep 15; do copy_results; done) &
COPIER=$!
wait "${PIDS[@]}"
kill "$COPIER"
copy_results
"$PY" -m benchmarks.accuracy "${COMMON[@]}" --seeds 0,1,2 --reuse --out runs/frames_out/all >/dev/null 2>&1
cp runs/frames_out/all/accuracy.md "$OUT/all.md" 2>/dev/null
cat "$OUT/all.md" 2>/dev/null || tail -c 3000 "$OUT"/log*.txt
