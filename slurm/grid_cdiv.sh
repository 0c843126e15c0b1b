#!/bin/bash
#SBATCH --job-name=recall-grid-cdiv
#SBATCH --array=0-2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%A_%a.out
# c-Div over a grid of alpha, one array task per value (ALPHAS, default "1.2 1.4 2.0"):
#   sbatch [sbatch options] slurm/grid_cdiv.sh [CONFIG.yaml] [key=value ...]
# Task i trains loss.params.alpha=ALPHAS[i] into $GRID_DIR/alpha_<value> (GRID_DIR default
# runs/grid_cdiv). With other ALPHAS, give a matching --array=0-<n-1>. Each task is requeued and
# resumed on its own after preemption (its own job id and output dir).
source "${RECALL_DIST_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
read -r -a alphas <<<"${ALPHAS:-1.2 1.4 2.0}"
task=${SLURM_ARRAY_TASK_ID:?grid_cdiv.sh is a job array: submit it with sbatch (it sets --array)}
[ "$task" -lt "${#alphas[@]}" ] || rd_die "array task $task has no alpha: ALPHAS='${alphas[*]}'"
alpha=${alphas[$task]}
export OUTPUT_DIR=${GRID_DIR:-runs/grid_cdiv}/alpha_$alpha
config=configs/cdiv.yaml
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then config=$1; shift; fi
rd_train "$config" cdiv "loss.params.alpha=$alpha" "$@"
