#!/bin/bash
#SBATCH --job-name=recall-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# Train with any loss, from a config:  sbatch [sbatch options] slurm/train.sh CONFIG.yaml [key=value ...]
# Defaults above are for one node; override on the command line, e.g. on a GPU cluster
#   sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=64 slurm/train.sh configs/cdiv.yaml
# and on one CPU node with two ranks
#   sbatch --ntasks-per-node=2 --cpus-per-task=1 slurm/train.sh configs/tiny_cpu.yaml
# Submit from the repository root (logs go to slurm/logs/). Environment variables (venv, ranks per
# node, port, output dir, preemption) are described in slurm/common.sh and docs/launchers.md.
source "${RECALL_DIST_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
[ $# -ge 1 ] && [[ "$1" != *=* ]] || rd_die "usage: sbatch slurm/train.sh CONFIG.yaml [key=value ...]"
rd_train "" "" "$@"
