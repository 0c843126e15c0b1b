#!/bin/bash
#SBATCH --job-name=recall-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# Temperature sweep (Precision/Recall per temperature, table + PR-curve plot), spread over all ranks:
#   sbatch [sbatch options] slurm/sweep.sh [CONFIG.yaml] [key=value ...]       (CONFIG: configs/sweep.yaml)
# e.g. sbatch --nodes=2 --gpus-per-node=8 slurm/sweep.sh configs/sweep.yaml 'models=[{name: cdiv, path: runs/cdiv/final}]'
# Every rank computes its shards of the (model, prompt) items, each at every temperature; rank 0 writes sweep.csv,
# sweep.json and pr_curve.png to output_dir (OUTPUT_DIR overrides it). On USR1 (preemption or the time
# limit) the job requeues at once: shard files already written are kept, only the others are recomputed.
# Options and environment: see slurm/common.sh and docs/launchers.md.
source "${RECALL_DIST_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
rd_sweep configs/sweep.yaml "$@"
