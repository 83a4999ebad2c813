#!/usr/bin/env bash
# DAPO on the top-20% highest-entropy tokens, Qwen3-14B-Base: the paper's method.
# Recipe: examples/configs/qwen3_14b_top20.yaml (the paper's hyperparameters, DESIGN.md); planned for
# 16 nodes x 8 GPUs of 80 GB (docs/scaling.md). From the repository root, on every node:
#
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0> MASTER_PORT=29500 \
#     bash examples/run_qwen3_14b_top20.sh model.hf_dir=/models/Qwen3-14B-Base [key=value ...]
#
# Check first, anywhere, no GPU needed: prints the layout, the memory plan and the torchrun
# command, and exits non-zero on any mistake:
#
#   bash examples/run_qwen3_14b_top20.sh --dry-run [key=value ...]
#
# GPUS_PER_NODE (8) and GPU_MEMORY_GIB (80) describe other clusters; PYTHON picks the interpreter.
set -euo pipefail
export NNODES="${NNODES:-16}"  # the paper's 16 x 8 GPUs unless told otherwise
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/launch.py" --config "$here/configs/qwen3_14b_top20.yaml" \
  --hf-config "$here/configs/hf/qwen3-14b-base.json" "$@"
