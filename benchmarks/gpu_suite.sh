#!/usr/bin/env bash
# Every GPU measurement of the loss head and the 7B step, in one run that fits a short GPU lease
# (< 8 minutes on an H200), writing each result to $OUT as soon as it exists (a run cut short still
# returns what it measured).  In order:
#   1. the GPU tests: tests/parallel/test_gpu.py (-m gpu) and tests/parallel/test_triton_head.py, compiled;
#   2. the loss-head benchmark, bf16, N=16384, H=4096, V=32000 and 128256, with Liger in the same run;
#   3. a Llama-2-7B training step (FSDP2, one GPU, seq 4096) for nll, cdiv and truncr, with plan's prediction;
#   4. only with RUN_ZERO3=1 and time left: the same step under DeepSpeed ZeRO-3 + CPU offload.
# CPU-only predictions (recall-dist plan for 13B on 8 x H100, 7B ZeRO-3 offload) run alongside.
#
#   bash benchmarks/gpu_wheels.sh                     # here, once: wheels for the GPU machine -> .whl/
#   OUT=/some/dir bash benchmarks/gpu_suite.sh        # there (carry .whl)
#   OUT=/tmp/suite SUITE_TINY=1 SUITE_BUDGET_S=1500 PYTHON=.venv/bin/python DS_ACCELERATOR=cpu \
#     bash benchmarks/gpu_suite.sh                     # the CPU check, tiny shapes
#   SUITE_STAGES="train" bash benchmarks/gpu_suite.sh # a rerun of some stages (tests, bench, tune, train)
#
# Files in $OUT (at most 8, as the lease returns them): suite.log (everything, streamed), env.txt,
# pytest.txt, loss_bench.md, loss_bench.json, train_7b.md, train_7b.json, plans.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory for the results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TINY="${SUITE_TINY:-0}"
STAGES="${SUITE_STAGES:-tests bench train}"   # a rerun can name fewer: SUITE_STAGES=train
want() { [[ " $STAGES " == *" $1 "* ]]; }
BUDGET="${SUITE_BUDGET_S:-450}"   # seconds for the whole suite
START=$(date +%s)
SCRATCH="$(mktemp -d)"
LOG="$OUT/suite.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

log() { echo "[suite $(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# stage NAME SECONDS CMD...: run CMD under a hard time limit, its output appended to suite.log
stage() {
  local name=$1 limit=$2; shift 2
  if (( limit < 20 )); then log "$name: skipped, ${limit}s left for it"; return 1; fi
  log "$name: start (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "$name: rc=$rc after $(( $(date +%s) - t0 ))s$([[ $rc == 124 ]] && echo ' (TIMED OUT)')"
  return "$rc"
}

# -- 0. the machine, and the wheels it lacks (installed aside: the machine's torch is never replaced)
{
  date -u; nvidia-smi 2>&1 | head -15; nproc; free -g
  "$PY" -c "import sys, torch, triton, transformers; print(sys.version); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site")
if ls .whl/*.whl >/dev/null 2>&1; then
  if ! "${PIP[@]}" .whl/*.whl >> "$LOG" 2>&1; then  # one bad wheel must not cost the others
    for w in .whl/*.whl; do "${PIP[@]}" "$w" >> "$LOG" 2>&1 || log "wheel not installed: $w"; done
  fi
  export PYTHONPATH="$SCRATCH/site:${PYTHONPATH:-}"
  log "wheels from .whl installed into $SCRATCH/site: $(ls "$SCRATCH/site" | tr '\n' ' ')"
else
  log "no .whl/ (run benchmarks/gpu_wheels.sh here and carry .whl): Liger and DeepSpeed rows will be missing"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
"$PY" -c "import liger_kernel, deepspeed; print('liger', liger_kernel.__name__, 'deepspeed', deepspeed.__version__)" \
  >> "$OUT/env.txt" 2>&1

# CPU-only predictions, in the background while the GPU works
if [[ $TINY == 1 ]]; then PLAN_MODELS=(tiny-llama); else PLAN_MODELS=(llama2-13b); fi
(
  for model in "${PLAN_MODELS[@]}"; do
    echo "## $model, FSDP2, 8 GPUs of 80 GiB (H100), seq 4096"
    timeout 120 "$PY" -m recall_dist plan configs/cdiv.yaml "model=$model" backend.name=fsdp2 --nodes 1 --gpus-per-node 8 \
      --gpu-mem-gib 80 --seq-len 4096 2>&1
  done
  echo "## ${PLAN_MODELS[0]/13b/7b}, DeepSpeed ZeRO-3 + CPU offload, 1 GPU of 139 GiB, seq 4096"
  timeout 120 "$PY" -m recall_dist plan configs/cdiv.yaml "model=${PLAN_MODELS[0]/13b/7b}" backend.cpu_offload=true \
    --nodes 1 --gpus-per-node 1 --gpu-mem-gib 139 --seq-len 4096 2>&1
) > "$OUT/plans.txt" 2>&1 &
PLANS=$!

# -- 1. tests on the GPU (compiled Triton kernels, every rule, both entry points, bf16 and fp32)
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
TESTS=(tests/parallel/test_gpu.py tests/parallel/test_triton_head.py)
[[ $TINY == 1 ]] && { XDIST=""; TESTS=(tests/parallel/test_gpu.py); }  # no GPU: the gpu tests only skip
want tests && stage pytest $(( $(left) - 330 < 120 ? $(left) - 330 : 120 )) "$PY" -m pytest -q -rfE -p no:cacheprovider $XDIST \
  "${TESTS[@]}" > "$OUT/pytest.txt"
want tests && tail -5 "$OUT/pytest.txt" | tee -a "$LOG"

# -- 2. the loss head: ours (Triton, both matmul engines; the PyTorch path) vs Liger vs naive
if [[ $TINY == 1 ]]; then
  BENCH=(--device cpu --dtype fp32 --tokens 256 --hidden 64 --seq-len 64 --vocabs 1000 --repeats 1 --warmup 1
    --methods naive liger nll truncr nll@torch)
else
  BENCH=(--device cuda --dtype bf16 --tokens 16384 --hidden 4096 --seq-len 4096 --vocabs 32000 128256 --repeats 5
    --warmup 1 --methods naive liger liger_fp32acc nll cdiv lambda_pr truncr nll@cublas truncr@cublas nll@single
    cdiv@single nll@torch)
fi
want bench && stage loss_bench $(( $(left) - 200 < 170 ? $(left) - 200 : 170 )) \
  "$PY" benchmarks/loss_bench.py "${BENCH[@]}" --json "$OUT/loss_bench.json" > "$OUT/loss_bench.md"

# -- 2b. only when asked (SUITE_STAGES="... tune"): our nll at V=128256 with other Triton tile sizes
if want tune && [[ $TINY != 1 ]]; then
  for tiles in 128,256,64,8,3,16 64,128,64,4,4,16 128,128,64,8,4,32; do
    RECALL_DIST_TRITON_TILES=$tiles stage "tune_$tiles" $(( $(left) - 200 < 60 ? $(left) - 200 : 60 )) \
      "$PY" benchmarks/loss_bench.py "${BENCH[@]:0:10}" --vocabs 128256 --repeats 5 --warmup 1 --methods nll truncr \
      >> "$OUT/loss_bench.md"
  done
fi

# -- 3. the 7B step through the trainer (FSDP2, one GPU), nll / cdiv / truncr
TRAIN=(--out "$SCRATCH/train" --steps 3 --warmup 1)
[[ $TINY == 1 ]] && TRAIN+=(--tiny --seq 64 --steps 1)
want train && stage train_7b_fsdp2 $(( $(left) - 15 )) "$PY" benchmarks/gpu_train_7b.py "${TRAIN[@]}"
if [[ ${RUN_ZERO3:-0} == 1 ]]; then
  stage train_7b_zero3_offload $(( $(left) - 15 )) "$PY" benchmarks/gpu_train_7b.py "${TRAIN[@]}" \
    --backend zero3_offload --losses nll cdiv
fi
{ for f in "$SCRATCH"/train/summary_*.md "$SCRATCH"/train/plan_*.txt; do [[ -f $f ]] && { echo "## $(basename "$f")"; cat "$f"; echo; }; done; } \
  > "$OUT/train_7b.md"
"$PY" -c "import json, pathlib, sys; print(json.dumps({p.stem: json.loads(p.read_text()) \
for p in sorted(pathlib.Path(sys.argv[1]).glob('train_*.json'))}, indent=1))" "$SCRATCH/train" > "$OUT/train_7b.json"

wait "$PLANS"
log "done in $(( $(date +%s) - START ))s; files: $(ls "$OUT" | tr '\n' ' ')"
