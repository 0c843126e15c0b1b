#!/bin/bash
# One per node (started by srun from slurm/common.sh): torchrun with a static rendezvous on the head
# node.  SLURM_NODEID is this node's index in the allocation; node 0 is the head (MASTER_ADDR).
set -euo pipefail
: "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${NNODES:?}" "${NPROC_PER_NODE:?}" "${SLURM_NODEID:?}"
exec python -m torch.distributed.run \
  --nnodes="$NNODES" --node-rank="$SLURM_NODEID" --nproc-per-node="$NPROC_PER_NODE" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
  "$@"
