#!/bin/bash
# Multi-node without SLURM: run this on every node with the same MASTER_ADDR/MASTER_PORT.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/torchrun.sh configs/kd.yaml
# torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; Lightning's TorchElasticEnvironment picks them up.
set -euo pipefail
CONFIG=${1:?usage: scripts/torchrun.sh CONFIG.yaml [overrides...]}
shift
GPUS=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m distill fit --config "$CONFIG" --trainer.num_nodes "${NNODES:-1}" --trainer.devices "$GPUS" "$@"
