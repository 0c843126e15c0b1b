#!/bin/bash
#SBATCH --job-name=recall-cdiv
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# Train with the cdiv loss:  sbatch [sbatch options] slurm/train_cdiv.sh [CONFIG.yaml] [key=value ...]
# CONFIG defaults to configs/cdiv.yaml; whatever the config, loss.name=cdiv is applied (before your
# key=value overrides). Options and environment: see slurm/train.sh, slurm/common.sh, docs/launchers.md.
source "${RECALL_DIST_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
rd_train configs/cdiv.yaml cdiv "$@"
