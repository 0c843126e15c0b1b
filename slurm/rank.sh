#!/bin/bash
# One rank of a job (started by torchrun, or by srun with LAUNCHER=srun; see slurm/common.sh): say
# where it runs, then `exec python "$@"`.  The line is how a multi-node job log shows which host each
# rank landed on and which address its collectives use:
#   [recall_dist] rank 1/2 (node 1, local 0) on node2 [rdnet0 10.77.0.2], master node1:40141
# (master: the host and port of rank 0's store, where the process group meets).
set -euo pipefail
# srun gives SLURM_* only; torch.distributed's env:// and DeepSpeed read these.
export RANK=${RANK:-${SLURM_PROCID:?}} WORLD_SIZE=${WORLD_SIZE:-${SLURM_NTASKS:?}}
export LOCAL_RANK=${LOCAL_RANK:-${SLURM_LOCALID:-0}}
iface=${GLOO_SOCKET_IFNAME:-${NCCL_SOCKET_IFNAME:-}}
iface=${iface%%,*}  # a list ("ib0,ib1"): the first names the rank's address well enough
if [[ -n "$iface" && "$iface" != ^* ]] && command -v ip >/dev/null; then
  addr="$iface $(ip -4 -o addr show dev "$iface" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -n1)"
else
  addr=$(hostname -I 2>/dev/null | awk '{print $1}')
fi
echo "[recall_dist] rank $RANK/$WORLD_SIZE (node ${GROUP_RANK:-${SLURM_NODEID:-0}}, local $LOCAL_RANK)" \
     "on $(hostname) [$addr], master ${MASTER_ADDR:-?}:${MASTER_PORT:-?}"
exec python "$@"
