#!/usr/bin/env bash
# The main job, from a fresh clone on a CPU machine (its measured time: README.md, docs/toy-study.md):
# install, take the shipped toy base (results/toy-study/base; --pretrain trains it anew), align it with
# SFT, DPO and RPO at one seed, each at the lr where it reaches about style 0.7, sample the 12 held-out prompts, score
# style and content, print the table, and write runs/demo/{results.md,results.json,grid.png,
# curves.png}. The main study, the README's factorial (hours; docs/toy-study.md):
#   python -m toy.factorial & python -m toy.factorial; wait; python -m toy.factorial --collect
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first: 2.13.0 is the CPU build this project's CI machines hold on local disk. With a
# torch already installed (a CUDA build, say) nothing is changed.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -r requirements.txt
python3 -m toy.experiment --study demo "$@"
