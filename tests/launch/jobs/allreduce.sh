#!/bin/bash
#SBATCH --job-name=rd-allreduce
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:05:00
#SBATCH --output=%x-%j.out
# Test job: slurm/common.sh's rendezvous + srun/torchrun launch on a 2-rank all-reduce.
#   sbatch tests/launch/jobs/allreduce.sh OUT_DIR
source "${RECALL_DIST_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
rd_setup_env
rd_setup_rendezvous
rd_python_step tests/launch/jobs/allreduce.py "$1"  # slurm/rank.sh sets RANK etc. under srun too
rd_log "step exited $RD_RC"
exit "$RD_RC"
