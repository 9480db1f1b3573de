#!/usr/bin/env bash
# Issue #29's check, rerunnable by anyone on one GPU: train.py as users run it (SDXL 1024², 4 pairs,
# its defaults, random weights: no download) against the bench/speed.py step, on raw 1024² JPEG
# pairs and on a cache of them. bench, raw and cached run alternately (REPEAT times, each in its
# own process); it prints the three pairs/s figures, their ratios and the peak memory, and
# appends every run's row and a summary row {"mode": "e2e", ...} to $OUT with the GPU's name
# and the torch and diffusers versions (python -m bench.e2e does the work).
#   bash bench/gpu_e2e.sh                 # on the GPU machine; rows in results/e2e_gpu.jsonl
#   REPEAT=3 T=900 bash bench/gpu_e2e.sh  # more alternations, a longer limit per run (s)
#   PROFILE=1 bash bench/gpu_e2e.sh       # then the raw run once more, profiled (bench/profile.py)
#   DRY=1 bash bench/gpu_e2e.sh           # the same steps on the CPU with tiny-xl, about half a minute
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
DRY=${DRY:-0}
PY=${PY:-python3}
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-/tmp/e2e-dry/e2e-dry.jsonl}; FLAGS="--dry"
else
  OUT=${OUT:-results/e2e_gpu.jsonl}; FLAGS=""
fi
mkdir -p "$(dirname "$OUT")"
if ls .whl/diffusers*.whl >/dev/null 2>&1; then  # diffusers is not on every GPU image: the wheels, if brought along
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/diffusers*.whl .whl/importlib_metadata*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ "${PROFILE:-0}" = 1 ] && FLAGS="$FLAGS --profile"
$PY -m bench.e2e $FLAGS --out "$OUT" --timeout "${T:-600}" ${REPEAT:+--repeat "$REPEAT"} ${BENCH_TMP:+--tmp "$BENCH_TMP"}
