#!/usr/bin/env bash
# The GPU speed levers, cached vs raw data and the NCCL/FSDP runs in ONE run on
# one H100/H200 (bench/speed.py does the measuring; each row is one JSON line with the GPU's name, appended to $OUT/bench_gpu.jsonl):
#   1. sdxl   SDXL 1024² full-FT, bf16 + fused AdamW, 4 pairs, in one process: eager baselines,
#             cuDNN attention, channels_last, regional compile (a cold compile on a fresh
#             machine) with selective checkpointing, the same for DPO, 8 pairs; the grid starts
#             no row after SDXL_BUDGET seconds
#   2. data   SD1.5 512², real architectures with random weights (bench/speed.py --pretrained random):
#             train.py pairs/s on raw JPEG pairs (decode + VAE + text encoder + CLIP ViT-L/14 every
#             step) vs on data.py's cache of the same pairs
#   3. dist   torchrun --nproc_per_node 1 train.py with DDP and with --fsdp: NCCL on the GPU.
#             tiny-xl: a few steps, --save_every, then --resume (the two series side by side);
#             then the SD1.5-size random UNet on the cache from 2., DDP vs FSDP step time and memory
# The SDXL grid runs first: it is the section that needs the most of a short lease (docs/speed-gpu.md).
#     bash bench/gpu_levers.sh                  # on the GPU machine
#     DRY=1 bash bench/gpu_levers.sh            # the same steps on the CPU with tiny presets (a test)
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-results/levers-out}
mkdir -p "$OUT"
rows=$OUT/bench_gpu.jsonl
SDXL_BUDGET=${SDXL_BUDGET:-180}  # seconds after which section 1 starts no new row
DRY=${DRY:-0}
PY=${PY:-python3}
export BENCH_TMP=${BENCH_TMP:-/tmp/bench-levers}
rm -rf "$BENCH_TMP"; mkdir -p "$BENCH_TMP"
say() { echo "# [$SECONDS s] $*"; }

if ls .whl/*.whl >/dev/null 2>&1; then  # diffusers (and what it needs) is not on the GPU image
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'EOF' | tee -a "$rows"
import json, torch, diffusers, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
mem = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None
print(json.dumps({"mode": "env", "gpu": gpu, "gpu_mem_GiB": mem, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version(), "diffusers": diffusers.__version__,
                  "transformers": transformers.__version__,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}))
EOF

if [ "$DRY" = 1 ]; then
  DATA="--model tiny-sd --batch_size 2 --steps 2 --warmup 1 --mixed_precision no --num_workers 0,2"
  DIST_TINY="--model tiny-xl --batch_size 2 --num_items 32"
  DIST_BIG="--model tiny-sd --batch_size 2 --max_steps 3"
  SDXL="--model tiny-xl --batch_size 2 --steps 1 --warmup 1 --device cpu"
  B8=4
else
  DATA="--model sd15 --pretrained random --batch_size 16 --steps 4 --warmup 2 --mixed_precision bf16 --num_workers 0"
  DIST_TINY="--model tiny-xl --batch_size 4 --num_items 64"
  DIST_BIG="--model sd15 --pretrained random --batch_size 8 --max_steps 5"
  SDXL="--model sdxl --resolution 1024 --mixed_precision bf16 --optimizer adamw_fused --batch_size 4 --steps 4 --warmup 2"
  B8=8
fi

# 1. SDXL levers --------------------------------------------------------------------------
left=$SDXL_BUDGET
say "1. sdxl: levers, $left s of rows"
GRID='[{"checkpointing": "all"},
 {"checkpointing": "none"},
 {"checkpointing": "none", "sdpa_backend": "cudnn"},
 {"compile": "regional", "checkpointing": "transformer:0.25", "sdpa_backend": "cudnn"},
 {"compile": "regional", "checkpointing": "transformer:0.25", "sdpa_backend": "cudnn", "loss": "dpo"},
 {"compile": "regional", "checkpointing": "none", "sdpa_backend": "cudnn"},
 {"compile": "regional", "checkpointing": "transformer:0.25", "sdpa_backend": "cudnn"},
 {"compile": "regional", "checkpointing": "transformer:0.5", "sdpa_backend": "cudnn"},
 {"checkpointing": "none", "channels_last": true},
 {"compile": "regional", "checkpointing": "transformer:0.25", "sdpa_backend": "cudnn", "channels_last": true},
 {"compile": "regional", "checkpointing": "transformer", "sdpa_backend": "cudnn", "batch_size": '$B8'}]'
[ "$DRY" = 1 ] && GRID=${GRID//regional/none}  # (inductor on a CPU takes minutes per graph)
timeout $((left + 60)) $PY bench/speed.py $SDXL --loss rpo --grid "$GRID" --time_budget "$left" --out "$rows" 2>&1 \
  | tee -a "$OUT/full.log" | grep -vE 'Warning|warn\(' | grep -E '^(sdxl|tiny|Traceback|[A-Za-z]*Error)' | cut -c1-400

# 2. cached vs raw ----------------------------------------------------------------------
say "2. data: raw vs cached"
timeout 110 $PY bench/speed.py --data fake-pickapic $DATA --json --out "$rows" 2>&1 | tee -a "$OUT/full.log" \
  | grep -vE 'Warning|warn\(' | tail -n 6 | cut -c1-400
CACHE=$(ls -d "$BENCH_TMP"/bench-data-*/cache 2>/dev/null | head -n 1)

# 3. NCCL: DDP and FSDP under torchrun ---------------------------------------------------
say "3. dist: tiny-xl DDP and FSDP, save + resume (side by side)"
dist() {  # name port extra-flags...: a run, then a --resume run two steps further
  local name=$1 port=$2; shift 2
  for phase in "--max_steps 4 --save_every 2" "--max_steps 6 --resume"; do
    timeout 90 $PY -m torch.distributed.run --nproc_per_node 1 --master_port "$port" bench/speed.py train $DIST_TINY \
      --out_dir "$BENCH_TMP/$name" --no_progress $phase "$@" >"$BENCH_TMP/$name.log" 2>&1
    echo "{\"mode\": \"dist-exit\", \"run\": \"$name $phase\", \"rc\": $?}"
    grep -E '^\{' "$BENCH_TMP/$name.log" | tail -n 1
  done
}
dist tiny-ddp 29511 > "$BENCH_TMP/ddp.rows" &
dist tiny-fsdp 29512 --fsdp > "$BENCH_TMP/fsdp.rows" &
wait
cat "$BENCH_TMP/ddp.rows" "$BENCH_TMP/fsdp.rows" | tee -a "$rows"
for f in "$BENCH_TMP"/tiny-*.log; do grep -iE 'error|Traceback|resumed' "$f" | head -n 5; done
if [ -n "$CACHE" ]; then
  say "3. dist: SD1.5-size UNet on the cache, DDP then FSDP"
  for mode in "" "--fsdp"; do
    timeout 80 $PY -m torch.distributed.run --nproc_per_node 1 --master_port 29513 bench/speed.py train $DIST_BIG \
      --data "cache:$CACHE" --out_dir "$BENCH_TMP/big$mode" --no_progress --keep_checkpoints 1 $mode \
      >"$BENCH_TMP/big$mode.log" 2>&1
    echo "{\"mode\": \"dist-exit\", \"run\": \"big $mode\", \"rc\": $?}" | tee -a "$rows"
    grep -E '^\{' "$BENCH_TMP/big$mode.log" | tail -n 1 | tee -a "$rows"
    grep -iE 'error|Traceback' "$BENCH_TMP/big$mode.log" | head -n 5
    rm -rf "$BENCH_TMP/big$mode"
  done
fi

tail -n 40 "$BENCH_TMP"/*.log > "$OUT/dist_logs.txt" 2>&1
say "done; rows in $rows"
$PY - "$rows" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("mode") is None and "ms_per_step" in r or "error" in r:
        lev = f"{r.get('compile')}/{r.get('checkpointing')}/{r.get('sdpa_backend')}/{'cl' if r.get('channels_last') else '-'}"
        print(f"{r.get('loss')} B={r.get('batch_size')} {lev:40s} ms={r.get('ms_per_step')} mfu={r.get('mfu')} "
              f"mem={r.get('peak_mem_GiB')} compile_s={r.get('compile_s')} {r.get('error', '')[:80]}")
    elif r.get("mode") == "data":
        print(f"data w={r['num_workers']} raw={r['raw_pairs_per_s']} cached={r['cached_pairs_per_s']} x{r['cached_over_raw']}")
    elif r.get("mode") == "train.py":
        print(f"dist {r['parallel']} resumed={r['resumed']} ms={r.get('ms_per_step')} mem={r.get('peak_mem_GiB')} {r['argv'][:60]}")
EOF
