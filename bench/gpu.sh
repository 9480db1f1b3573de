#!/usr/bin/env bash
# The GPU comparison table behind the README's speed and memory figures: SD1.5 at 512² and
# SDXL at 1024², RPO vs DPO, the main flag combinations, LoRA, and the official Diffusion-DPO
# SDXL setup as a baseline, on one H100/H200. One JSON line per configuration
# (bench/speed.py --json), also written to ${OUT:-.}/bench_gpu.jsonl.
#   bash bench/gpu.sh
set -u
export PYTHONUNBUFFERED=1
log=${OUT:-.}/bench_gpu.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python3 -c "import torch, diffusers; print({'torch': torch.__version__, 'diffusers': diffusers.__version__})" | tee -a "$log"
run() {  # each configuration in its own process: a crash or OOM costs one row, not the table
  echo "# $*" | tee -a "$log"
  timeout "${T:-120}" python3 -m bench.speed --json --steps 8 --warmup 3 "$@" 2>&1 | grep -E '^\{|Error|error' | tee -a "$log"
}
SD15="--model sd15 --resolution 512 --mixed_precision bf16 --optimizer adamw_fused"
SDXL="--model sdxl --resolution 1024 --mixed_precision bf16 --optimizer adamw_fused"
run $SD15 --loss rpo --batch_size 16
run $SD15 --loss dpo --batch_size 16
run $SD15 --loss rpo --batch_size 16 --gradient_checkpointing
run $SD15 --loss rpo --batch_size 32 --gradient_checkpointing
T=200 run $SDXL --loss rpo --batch_size 4 --gradient_checkpointing --preset dpo-reference
run $SDXL --loss dpo --batch_size 4 --gradient_checkpointing
run $SDXL --loss rpo --batch_size 4
run $SDXL --loss rpo --batch_size 8 --gradient_checkpointing
run $SDXL --loss rpo --batch_size 4 --gradient_checkpointing --lora_rank 16
T=150 run $SD15 --loss rpo --batch_size 16 --compile
