#!/bin/bash
# The sweep stage of `make demo-lm` for one model (the converted SmolLM2, un-fine-tuned), 2 ranks of one thread,
# exactly as the demo runs it (its sweep.yaml, its support file), at revision OLD and in this tree; prints each
# wall time and the ratio.  OLD defaults to 55df6ec (before the sweep's scored-position softmaxes and the demos'
# `dtype: bfloat16_if_native`; at OLD the demo swept in bf16 whatever the CPU).
#   bash benchmarks/demo_lm_sweep_stage.sh results/demo-lm/data/support.jsonl [OLD]
set -euo pipefail
support=$(realpath "$1"); old=${2:-55df6ec}
root=$(cd "$(dirname "$0")/.." && pwd); py=$root/.venv/bin
model=$("$py/python" -c "from recall_dist.convert import convert_known; print(convert_known())" 2>/dev/null | tail -1)
work=$(mktemp -d); trap 'git -C "$root" worktree remove --force "$work/old" >/dev/null 2>&1; rm -rf "$work"' EXIT
git -C "$root" worktree add -q "$work/old" "$old"
stage() {  # stage SRC NAME -> wall seconds
  local start; start=$(date +%s.%N)
  (cd "$1" && PYTHONPATH="$1" OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu "$py/torchrun" --standalone --nproc-per-node 2 \
    -m recall_dist sweep recall_dist/demo/configs/demo_lm/sweep.yaml "models=[{name: base, path: $model}]" \
    output_dir="$work/$2" support="$support" > "$work/$2.log" 2>&1) || { tail -20 "$work/$2.log"; exit 1; }
  echo "$(date +%s.%N) - $start" | bc
}
t_old=$(stage "$work/old" old); echo "at $old: ${t_old} s"
t_new=$(stage "$root" new); echo "this tree: ${t_new} s"
grep -m1 -o "dtype=.*" "$work/new.log" || true
echo "ratio old / new: $(echo "scale=2; $t_old / $t_new" | bc)x"
