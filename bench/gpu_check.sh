#!/usr/bin/env bash
# CUDA-graph / torch.compile checks of SAPT on a GPU machine. Run from anywhere:
#   bash bench/gpu_check.sh                      # fp32 + bf16, all checks
#   bash bench/gpu_check.sh --skip-compile       # without the torch.compile check
#   bash bench/gpu_check.sh --device cpu --dry-run   # eager paths on CPU, tiny shapes
# Installs nothing; needs torch (CUDA), transformers. Exit: 0 ok, 1 a check failed, 2 no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
