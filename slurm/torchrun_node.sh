#!/bin/bash
# One per node (started by srun from slurm/common.sh): torchrun with a c10d rendezvous hosted on the
# head node (MASTER_ADDR, the first host of the allocation), which spawns NPROC_PER_NODE ranks here.
# MAX_RESTARTS (train.max_restarts) is torchrun's --max-restarts: after a rank fails, every node's
# ranks are stopped and started again, re-rendezvous on the same nodes and resume from the last
# complete checkpoint (train.resume: auto).  A lost node cannot rejoin: Slurm's node failure
# handling (requeue) takes over; see docs/launchers.md.
set -euo pipefail
: "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${NNODES:?}" "${NPROC_PER_NODE:?}" "${SLURM_NODEID:?}" "${SLURM_JOB_ID:?}"
restarts=${MAX_RESTARTS:-0}
echo "[recall_dist] node $SLURM_NODEID/$NNODES on $(hostname): torchrun, $NPROC_PER_NODE rank(s)," \
     "c10d rendezvous $MASTER_ADDR:$MASTER_PORT, max restarts $restarts"
# The ranks' process group gets a store of its own on rank 0, new with each restart.  By default
# torchrun hands the ranks its rendezvous store, kept across restarts: restarted ranks then read
# the dead ranks' addresses left in it (gloo: "connectFullMesh failed ... Connection refused").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# The id changes with each requeue: a restarted job never joins its previous run's rendezvous.
# `recall-dist torchrun` is torchrun plus the run's own exit code after a signal (plain torchrun exits 1
# after Slurm's SIGTERM even when the ranks saved) and no orphan ranks if it dies (docs/robustness.md).
exec python -m recall_dist torchrun \
  --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --max-restarts="$restarts" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}" \
  --no-python bash "$(dirname "${BASH_SOURCE[0]}")/rank.sh" "$@"
