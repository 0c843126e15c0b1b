# shellcheck shell=bash
# Shared body of the recall_dist batch scripts (sourced by slurm/train*.sh, slurm/grid_cdiv.sh,
# slurm/sweep.sh; not submitted by itself).  See docs/launchers.md.
#
# Environment (all optional; set before `sbatch`, which exports the environment to the job):
#   RECALL_DIST_HOME   repository root                   [$SLURM_SUBMIT_DIR: submit from the repo root]
#   RECALL_DIST_VENV   virtualenv to activate            [$RECALL_DIST_HOME/.venv]; "none": use the
#                      python already on PATH (modules, conda)
#   NPROC_PER_NODE     ranks per node                    [GPUs on the node (--gpus-per-node), else
#                      --ntasks-per-node, else --ntasks / nodes, else 1]
#   MASTER_PORT        rendezvous port on the head node  [20000 + job id mod 20000]
#   LAUNCHER           torchrun (one torchrun per node)  [torchrun] | srun (one Slurm task per rank)
#   OUTPUT_DIR         overrides train.output_dir        [the config's]
#   RECALL_DIST_STOP_FILE  the preemption sentinel       [$OUTPUT_DIR/STOP]
#   RECALL_DIST_MAX_REQUEUES  restarts after failures     [3] (a lost node, `scontrol requeue`; not
#                      preemptions) before a training job gives up
#
# Preemption: submit with `--signal=B:USR1@<seconds>` and `--requeue` (the scripts' defaults).  Slurm
# signals only this batch shell (torchrun would not forward USR1 to the workers, pytorch #154849);
# the trap touches $RECALL_DIST_STOP_FILE, the workers agree at the next step boundary, save a
# checkpoint, write $OUTPUT_DIR/PREEMPTED and exit 0; then the script runs `scontrol requeue` and the
# requeued job (same job id, same OUTPUT_DIR) resumes from that checkpoint (train.resume: auto).
#
# A lost node: its slurmd stops answering, slurmctld declares it DOWN after SlurmdTimeout and ends
# the job as NODE_FAIL ("srun: error: Node failure on <node>" in the job log); with --requeue Slurm
# requeues it, it waits for enough healthy nodes, and resumes from the last complete checkpoint.
# A failing rank on healthy nodes: torchrun restarts every rank in place, train.max_restarts times.

set -euo pipefail

rd_log() { echo "[recall_dist $(date +%H:%M:%S)] $*"; }
rd_die() { echo "[recall_dist] ERROR: $*" >&2; exit 1; }

# The latest complete checkpoint under $OUTPUT_DIR (step_XXXXXXXX: the glob sorts them by step).
rd_latest_checkpoint() {
  local d latest=none
  for d in "$OUTPUT_DIR"/checkpoints/step_*; do [ -f "$d/COMPLETE" ] && latest=$d; done
  echo "$latest"
}

# Repository, virtualenv, python.
rd_setup_env() {
  [ -n "${SLURM_JOB_ID:-}" ] || rd_die "not inside a Slurm job: submit with sbatch (see docs/launchers.md)"
  RECALL_DIST_HOME=${RECALL_DIST_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
  cd "$RECALL_DIST_HOME" || rd_die "cannot cd to RECALL_DIST_HOME=$RECALL_DIST_HOME"
  [ -d recall_dist ] || rd_die "$RECALL_DIST_HOME is not the recall_dist repository: submit from the repo root or set RECALL_DIST_HOME"
  RECALL_DIST_VENV=${RECALL_DIST_VENV:-$RECALL_DIST_HOME/.venv}
  if [ "$RECALL_DIST_VENV" != none ]; then
    [ -f "$RECALL_DIST_VENV/bin/activate" ] || rd_die "no virtualenv at RECALL_DIST_VENV=$RECALL_DIST_VENV (run 'make setup', or set RECALL_DIST_VENV=none to use the python on PATH)"
    # shellcheck disable=SC1091
    source "$RECALL_DIST_VENV/bin/activate"
  fi
  PY=$(command -v python) || rd_die "no python on PATH"
  export PYTHONUNBUFFERED=1
}

# Head node, ports and ranks of the allocation.  The head is the first host of the allocation:
# never localhost on a multi-node job (the other nodes would rendezvous with themselves).
rd_setup_rendezvous() {
  NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n1 || true)
  [ -n "$MASTER_ADDR" ] || rd_die "could not read the head node from SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}' (scontrol show hostnames gave nothing); refusing to fall back to localhost"
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  local gpus=${SLURM_GPUS_ON_NODE:-0}
  gpus=${gpus%%(*}  # "4(IDX:0-3)" on some versions
  if [ -n "${NPROC_PER_NODE:-}" ]; then :
  elif [ "${gpus:-0}" -gt 0 ] 2>/dev/null; then NPROC_PER_NODE=$gpus
  elif [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then NPROC_PER_NODE=${SLURM_NTASKS_PER_NODE%%(*}
  elif [ -n "${SLURM_NTASKS:-}" ]; then NPROC_PER_NODE=$(( (SLURM_NTASKS + NNODES - 1) / NNODES ))  # --ntasks only
  else NPROC_PER_NODE=1
  fi
  WORLD_SIZE=$((NNODES * NPROC_PER_NODE))
  LAUNCHER=${LAUNCHER:-torchrun}
  export MASTER_ADDR MASTER_PORT NNODES NPROC_PER_NODE
}

# srun for one step: the torchrun launcher starts one task per node that spawns NPROC_PER_NODE
# ranks (and gives it all the CPUs of its node); the srun launcher starts one task per rank.
rd_srun_argv() {
  local cpus=${SLURM_CPUS_ON_NODE:-1}
  case "$LAUNCHER" in
    torchrun)
      RD_SRUN=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus"
               --kill-on-bad-exit=1 bash slurm/torchrun_node.sh) ;;
    srun)
      RD_SRUN=(srun --nodes="$NNODES" --ntasks="$WORLD_SIZE" --ntasks-per-node="$NPROC_PER_NODE"
               --kill-on-bad-exit=1) ;;
    *) rd_die "LAUNCHER=$LAUNCHER: allowed: torchrun, srun" ;;
  esac
}

RD_SIGNALLED=""
RD_SIGNAL_ACTION=checkpoint  # checkpoint (training) | requeue (the sweep: finished shards are kept)
rd_on_signal() {
  RD_SIGNALLED=$1
  if [ "$RD_SIGNAL_ACTION" = requeue ]; then
    rd_log "caught SIG$1: requeueing job $SLURM_JOB_ID now (finished shards are kept; the rest are recomputed)"
    scontrol requeue "$SLURM_JOB_ID" || rd_die "scontrol requeue $SLURM_JOB_ID failed"
    exit 0
  fi
  rd_log "caught SIG$1: asking the workers to checkpoint and stop (touching $RECALL_DIST_STOP_FILE)"
  touch "$RECALL_DIST_STOP_FILE"
}

# rd_run_step CMD...: run CMD on every rank in the background so the traps fire, wait for it.
# Sets RD_RC to the step's exit status.
rd_run_step() {
  rd_srun_argv
  trap 'rd_on_signal USR1' USR1
  trap 'rd_on_signal TERM' TERM
  rd_log "step: ${RD_SRUN[*]} $*"
  "${RD_SRUN[@]}" "$@" &
  local pid=$!
  while :; do
    set +e; wait "$pid"; RD_RC=$?; set -e
    if [ "$RD_RC" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi  # a trap interrupted wait
    if [ "$RD_RC" -gt 128 ]; then  # interrupted just as the step ended: collect its real status
      set +e; wait "$pid"; local again=$?; set -e
      [ "$again" -ne 127 ] && RD_RC=$again
    fi
    break
  done
  trap - USR1 TERM
}

# rd_python_step PYTHON_ARGS...: `python PYTHON_ARGS` on every rank (a script or -m module), through
# slurm/rank.sh (which logs the rank's host and address).
rd_python_step() {
  if [ "$LAUNCHER" = torchrun ]; then rd_run_step "$@"; else rd_run_step bash slurm/rank.sh "$@"; fi
}

# The training job: config + key=value overrides from the command line.
#   rd_train DEFAULT_CONFIG LOSS_NAME_OR_EMPTY [CONFIG.yaml] [key=value ...]
rd_train() {
  local default_config=$1 loss=$2; shift 2
  CONFIG=$default_config
  if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then CONFIG=$1; shift; fi
  OVERRIDES=()
  [ -n "$loss" ] && OVERRIDES+=("loss.name=$loss")  # the named entry point trains the loss it names
  [ -n "${OUTPUT_DIR:-}" ] && OVERRIDES+=("train.output_dir=$OUTPUT_DIR")
  OVERRIDES+=("$@")  # the user's overrides win

  rd_setup_env
  rd_setup_rendezvous
  [ -f "$CONFIG" ] || rd_die "config not found: $CONFIG (relative to $RECALL_DIST_HOME)"
  # Validate the config before the step starts, and learn where it writes.
  local settings
  settings=$("$PY" - "$CONFIG" "${OVERRIDES[@]}" <<'PYEOF'
import sys
from recall_dist.train.config import load_train_config
train = load_train_config(sys.argv[1], sys.argv[2:]).train
print(train.max_restarts, train.output_dir)
PYEOF
) || rd_die "invalid config $CONFIG ${OVERRIDES[*]}"
  read -r MAX_RESTARTS OUTPUT_DIR <<<"$(tail -n1 <<<"$settings")"
  export MAX_RESTARTS  # torchrun's --max-restarts (slurm/torchrun_node.sh)
  mkdir -p "$OUTPUT_DIR"
  rd_check_restart
  export RECALL_DIST_STOP_FILE=${RECALL_DIST_STOP_FILE:-$OUTPUT_DIR/STOP}
  rm -f "$RECALL_DIST_STOP_FILE"  # a sentinel left by the run before a requeue

  rd_log "job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)} restart ${SLURM_RESTART_COUNT:-0}: " \
         "$NNODES node(s) x $NPROC_PER_NODE rank(s), head $MASTER_ADDR:$MASTER_PORT, launcher $LAUNCHER"
  rd_log "config $CONFIG ${OVERRIDES[*]} -> $OUTPUT_DIR (python $PY)"

  local started
  started=$(date +%s)
  rd_python_step -m recall_dist train "$CONFIG" "${OVERRIDES[@]}"
  rd_finish "$started"
}

# Why a training job runs again.  A restart without $OUTPUT_DIR/PREEMPTED (which the trainer writes
# when it stops for a preemption, and clears when it starts) followed a failure: Slurm's requeue
# after a node failure, or an administrator's `scontrol requeue`.  Those are counted per job in
# $OUTPUT_DIR/FAILURE_REQUEUES; past RECALL_DIST_MAX_REQUEUES the job gives up (a failure that
# keeps coming back needs a person).  Preemption requeues are not counted.
rd_check_restart() {
  local restart=${SLURM_RESTART_COUNT:-0} max=${RECALL_DIST_MAX_REQUEUES:-3} ledger n
  [ "$restart" -gt 0 ] || return 0
  if [ -f "$OUTPUT_DIR/PREEMPTED" ]; then
    rd_log "restart $restart after a preemption at step $(cat "$OUTPUT_DIR/PREEMPTED")"
    return 0
  fi
  ledger=$OUTPUT_DIR/FAILURE_REQUEUES
  grep -qx "$SLURM_JOB_ID $restart" "$ledger" 2>/dev/null || echo "$SLURM_JOB_ID $restart" >>"$ledger"
  n=$(grep -c "^$SLURM_JOB_ID " "$ledger")
  if [ "$n" -gt "$max" ]; then
    rd_die "job $SLURM_JOB_ID was requeued after a failure $n times (a lost node, or scontrol requeue)," \
           "more than RECALL_DIST_MAX_REQUEUES=$max: giving up. Last complete checkpoint:" \
           "$(rd_latest_checkpoint) (submitting the same command again resumes from it)"
  fi
  rd_log "restart $restart after a failure (a lost node, or scontrol requeue; not a preemption):" \
         "failure requeue $n of at most $max; last complete checkpoint: $(rd_latest_checkpoint)"
}

# After the step: requeue if we were signalled and the workers checkpointed cleanly.
rd_finish() {
  local started=$1
  if [ -z "$RD_SIGNALLED" ]; then
    rd_log "step exited $RD_RC after $(( $(date +%s) - started ))s"
    if [ "$RD_RC" -ne 0 ]; then
      rd_log "the step failed: after a node failure Slurm requeues the job (--requeue) and it resumes;" \
             "otherwise submitting the same command again resumes from $(rd_latest_checkpoint)"
    fi
    exit "$RD_RC"
  fi
  if [ "$RD_RC" -ne 0 ]; then
    rd_die "signalled (SIG$RD_SIGNALLED) but the workers exited $RD_RC: not requeueing; resume by hand from the last checkpoint in $OUTPUT_DIR/checkpoints"
  fi
  if [ -f "$OUTPUT_DIR/PREEMPTED" ]; then
    rd_log "workers checkpointed at step $(cat "$OUTPUT_DIR/PREEMPTED"); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || rd_die "scontrol requeue $SLURM_JOB_ID failed"
    exit 0
  fi
  rd_log "signalled, but the run finished before it had to stop (no $OUTPUT_DIR/PREEMPTED): not requeueing"
  exit 0
}

# The temperature sweep: every rank runs `recall-dist sweep`, computes its shards, rank 0 aggregates.
#   rd_sweep DEFAULT_CONFIG [CONFIG.yaml] [key=value ...]
rd_sweep() {
  CONFIG=$1; shift
  if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then CONFIG=$1; shift; fi
  OVERRIDES=()
  [ -n "${OUTPUT_DIR:-}" ] && OVERRIDES+=("output_dir=$OUTPUT_DIR")
  OVERRIDES+=("$@")

  rd_setup_env
  rd_setup_rendezvous
  [ -f "$CONFIG" ] || rd_die "config not found: $CONFIG (relative to $RECALL_DIST_HOME)"
  OUTPUT_DIR=$("$PY" - "$CONFIG" "${OVERRIDES[@]}" <<'PYEOF'
import sys
from recall_dist.configtree import load_config
from recall_dist.eval.config import SweepConfig
print(load_config(SweepConfig, sys.argv[1], sys.argv[2:]).output_dir)
PYEOF
) || rd_die "invalid sweep config $CONFIG ${OVERRIDES[*]}"
  OUTPUT_DIR=$(tail -n1 <<<"$OUTPUT_DIR")
  rd_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: sweep on $NNODES node(s) x $NPROC_PER_NODE rank(s), launcher $LAUNCHER"
  rd_log "config $CONFIG ${OVERRIDES[*]} -> $OUTPUT_DIR (python $PY)"
  RD_SIGNAL_ACTION=requeue
  local started
  started=$(date +%s)
  rd_python_step -m recall_dist sweep "$CONFIG" "${OVERRIDES[@]}"
  rd_log "step exited $RD_RC after $(( $(date +%s) - started ))s"
  exit "$RD_RC"
}
