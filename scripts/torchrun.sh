#!/bin/bash
# biofm fit under torchrun (one process per GPU; Lightning reads torchrun's environment), e.g. on one node
# with 8 GPUs, or with --nnodes/--rdzv-endpoint across nodes:
#   scripts/torchrun.sh 8 -c configs/pretrain/multimodal.yaml --data.stores '[stores/biobank.zarr]'
set -euo pipefail
GPUS=${1:?GPUs per node}; shift
exec torchrun --nproc-per-node "$GPUS" --nnodes "${NNODES:-1}" --rdzv-backend c10d \
    --rdzv-endpoint "${RDZV_ENDPOINT:-localhost:29400}" -m biofm fit \
    --trainer configs/trainer/gpu.yaml --trainer.devices "$GPUS" --trainer.num_nodes "${NNODES:-1}" "$@"
