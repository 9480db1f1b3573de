#!/usr/bin/env bash
# The GPU default, checked in ONE run on one H100/H200 (rows appended to
# $OUT/bench_gpu.jsonl with the GPU's name; bench/speed.py measures):
#   1. sdxl   SDXL 1024² full-FT, 4 pairs, bf16 + fused AdamW, regional compile + checkpointing of
#             the widest quarter of the transformer blocks + cuDNN attention: RPO and DPO alternated
#             3 times × 4 timed steps each (12 per loss; medians), then the same with a tenth of
#             the blocks checkpointed if time allows
#   2. paths  the same levers (--compile, --gradient_checkpointing transformer:0.25) in train.py
#             under torchrun with DDP, with --fsdp, and with --lora_rank (tiny-xl on the GPU):
#             4 steps with a checkpoint at 2, then --resume to 6
#     bash bench/gpu_defaults.sh               # on the GPU machine
#     SECTIONS=paths PATHS_RUNS="fsdp ddp" PATH_TIMEOUT=150 bash bench/gpu_defaults.sh   # one after the other
#     DRY=1 bash bench/gpu_defaults.sh         # the same steps on the CPU with tiny presets, no compile
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-results/defaults-out}
mkdir -p "$OUT"
rows=$OUT/bench_gpu.jsonl
DRY=${DRY:-0}
SECTIONS=${SECTIONS:-sdxl paths}
PATHS_RUNS=${PATHS_RUNS:-parallel}  # parallel: ddp, fsdp and lora at once; else these names, one after the other
PATH_TIMEOUT=${PATH_TIMEOUT:-90}
PY=${PY:-python3}
export BENCH_TMP=${BENCH_TMP:-/tmp/bench-defaults}
rm -rf "$BENCH_TMP"; mkdir -p "$BENCH_TMP"
say() { echo "# [$SECONDS s] $*"; }

if ls .whl/diffusers*.whl >/dev/null 2>&1; then  # diffusers (and peft for LoRA) are not on the GPU image
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/diffusers*.whl .whl/importlib_metadata*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import peft" 2>/dev/null || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/peft*.whl .whl/accelerate*.whl .whl/psutil*.whl
fi
$PY - <<'EOF' | tee -a "$rows"
import json, torch, diffusers, transformers
try:
    import peft; peft_v = peft.__version__
except Exception as e:
    peft_v = f"missing: {e}"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(json.dumps({"mode": "env", "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft_v}))
EOF

if [ "$DRY" = 1 ]; then
  SDXL="--model tiny-xl --batch_size 2 --steps 2 --warmup 1 --device cpu"; LEVERS="--compile none"
  PATHS="--model tiny-xl --batch_size 2 --num_items 32 --device cpu"
else
  SDXL="--model sdxl --resolution 1024 --mixed_precision bf16 --optimizer adamw_fused --batch_size 4 --steps 4 --warmup 2"
  LEVERS="--compile regional"
  PATHS="--model tiny-xl --batch_size 4 --num_items 64"
fi

# 1. SDXL: RPO and DPO alternated --------------------------------------------------------
if [[ " $SECTIONS " == *" sdxl "* ]]; then
say "1. sdxl: rpo,dpo x3, transformer:0.25"
timeout 280 $PY bench/speed.py $SDXL $LEVERS --checkpointing transformer:0.25 --sdpa_backend cudnn --loss rpo,dpo \
  --repeat 3 --json --label defaults --out "$rows" 2>&1 | tee -a "$OUT/full.log" | grep -E '^\{|Error|Traceback' | cut -c1-300
if [ "$SECONDS" -lt 200 ]; then
  say "1b. sdxl: rpo,dpo x2, transformer:0.1"
  timeout 100 $PY bench/speed.py $SDXL $LEVERS --checkpointing transformer:0.1 --sdpa_backend cudnn --loss rpo,dpo \
    --repeat 2 --json --label defaults --out "$rows" 2>&1 | tee -a "$OUT/full.log" | grep -E '^\{|Error|Traceback' | cut -c1-300
fi
fi

# 2. the same levers under DDP, FSDP and LoRA in train.py --------------------------------
say "2. paths: DDP, FSDP, LoRA with $LEVERS --gradient_checkpointing transformer:0.25"
path() {  # name port extra-flags...: a run, then a --resume run two steps further
  local name=$1 port=$2; shift 2
  for phase in "--max_steps 4 --save_every 2" "--max_steps 6 --resume"; do
    timeout "$PATH_TIMEOUT" $PY -m torch.distributed.run --nproc_per_node 1 --master_port "$port" bench/speed.py train $PATHS $LEVERS \
      --gradient_checkpointing transformer:0.25 --out_dir "$BENCH_TMP/$name" --no_progress $phase "$@" \
      >>"$BENCH_TMP/$name.log" 2>&1
    echo "{\"mode\": \"dist-exit\", \"run\": \"$name $LEVERS $phase\", \"rc\": $?}"
    grep -E '^\{' "$BENCH_TMP/$name.log" | tail -n 1
  done
}
declare -A EXTRA=([ddp]="" [fsdp]="--fsdp" [lora]="--lora_rank 8")
declare -A PORT=([ddp]=29521 [fsdp]=29522 [lora]=29523)
if [[ " $SECTIONS " == *" paths "* ]]; then
  if [ "$PATHS_RUNS" = parallel ]; then
    for n in ddp fsdp lora; do path $n ${PORT[$n]} ${EXTRA[$n]} > "$BENCH_TMP/$n.rows" & done
    wait
    names="ddp fsdp lora"
  else
    for n in $PATHS_RUNS; do say "paths: $n"; path $n ${PORT[$n]} ${EXTRA[$n]} > "$BENCH_TMP/$n.rows"; done
    names=$PATHS_RUNS
  fi
  for n in $names; do cat "$BENCH_TMP/$n.rows"; done | tee -a "$rows"
  for f in "$BENCH_TMP"/*.log; do echo "== $f"; grep -iE 'error|resum|recompil' "$f" | grep -v Warning | head -n 6; done
  for f in "$BENCH_TMP"/*.log; do echo "==> $f"; grep -v "UserWarning\|warnings.warn" "$f"; done > "$OUT/path_logs.txt" 2>&1
fi
say "done; rows in $rows"
