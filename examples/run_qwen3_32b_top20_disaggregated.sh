#!/usr/bin/env bash
# DAPO on the top-20% highest-entropy tokens, Qwen3-32B-Base, with disaggregated rollout: the
# trainer (torchrun) on NNODES nodes, 24 vLLM engines (tp 4) as Ray actors on ENGINE_NODES other
# nodes, one-step-off. Recipe: examples/configs/qwen3_32b_top20_disaggregated.yaml (the split and
# why: its header); commands, faults and what was not tested: docs/disaggregated.md.
#
# 0. One Ray auth token on every node (engine and trainer), at ~/.ray/auth_token: Ray 2.60's
#    `ray start` requires it when the node has one (docs/disaggregated.md, "The auth token").
# 1. The engine nodes form a Ray cluster (same image / venv on every node):
#      first engine node:   ray start --head --port=6379 --num-gpus=8
#      other engine nodes:  ray start --address=<head>:6379 --num-gpus=8
# 2. Trainer node 0 joins it with no resources, so that its rank 0 can be the Ray driver (a
#    driver attaches to a Ray node on its own machine) and no actor lands there:
#      ray start --address=<head>:6379 --num-gpus=0 --num-cpus=0
#    The engines must reach trainer node 0 for the weights (a TCP store on a free port of node 0,
#    then NCCL): no firewall between them.
# 3. On every trainer node, from the repository root:
#      RAY_ADDRESS=<head>:6379 NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<trainer node 0> \
#        bash examples/run_qwen3_32b_top20_disaggregated.sh model.hf_dir=/models/Qwen3-32B-Base
#
# Check first, anywhere, no GPU needed: prints the trainer/engine split, the memory plan of both,
# the ray commands and the torchrun command, and exits non-zero on any mistake:
#
#   bash examples/run_qwen3_32b_top20_disaggregated.sh --dry-run [key=value ...]
#
# RAY_ADDRESS becomes rollout.ray_address (a key=value argument overrides it). ENGINE_NODES (12),
# GPUS_PER_NODE (8) and GPU_MEMORY_GIB (80) describe other clusters; PYTHON picks the interpreter.
set -euo pipefail
export NNODES="${NNODES:-4}"                # trainer nodes
export ENGINE_NODES="${ENGINE_NODES:-12}"   # Ray engine nodes
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ray=()
if [ -n "${RAY_ADDRESS:-}" ]; then ray=("rollout.ray_address=$RAY_ADDRESS"); fi
exec "${PYTHON:-python}" "$here/launch.py" --config "$here/configs/qwen3_32b_top20_disaggregated.yaml" \
  --hf-config "$here/configs/hf/qwen3-32b.json" ${ray[@]+"${ray[@]}"} "$@"
