#!/bin/bash
#SBATCH --job-name=rd-restarts
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:05:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Test job: slurm/common.sh's account of why a job runs again (rd_check_restart), without the trainer.
#   sbatch tests/launch/jobs/restart_check.sh OUT_DIR      (then `scontrol requeue` it)
source "${RECALL_DIST_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
OUTPUT_DIR=$1
mkdir -p "$OUTPUT_DIR"
rd_check_restart
rd_log "ready (restart ${SLURM_RESTART_COUNT:-0})"
sleep 300
