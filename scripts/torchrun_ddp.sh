#!/bin/bash
# Multi-node DDP training with torchrun: run this once on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/torchrun_ddp.sh configs/seg3d_unet.yaml [medseg fit options]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 scripts/torchrun_ddp.sh configs/seg3d_unet.yaml [medseg fit options]
# One node: scripts/torchrun_ddp.sh configs/seg3d_unet.yaml   (or just --trainer.devices N, no torchrun)
# Add --ckpt_path last to resume after a stop.
set -euo pipefail
CONFIG=${1:?usage: scripts/torchrun_ddp.sh CONFIG [medseg fit options]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
DDP_CONFIG="$(cd "$(dirname "$0")/.." && pwd)/configs/trainer/ddp.yaml"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m medseg fit --config "$CONFIG" --config "$DDP_CONFIG" \
  --trainer.devices "$GPUS_PER_NODE" --trainer.num_nodes "$NNODES" "$@"
