#!/usr/bin/env bash
# Download (here, with internet) the wheels the GPU suite needs on a GPU machine that has none:
# Liger-Kernel (the head benchmark's baseline) and DeepSpeed with the pure-Python packages it needs
# (ZeRO-3 + CPU offload, and `recall-dist plan`'s DeepSpeed estimator).  torch, triton, transformers,
# pytest, numpy, pyyaml and tqdm are expected there already and are never replaced: the suite installs
# these wheels with --no-deps into a separate directory put first on PYTHONPATH.
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/ (git-ignored), then list what it holds
#
# Versions are pinned; the target is CPython 3.12 on manylinux x86_64 (the GPU machine's Python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEST=.whl
mkdir -p "$DEST"

PLATFORM=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(
  liger-kernel==0.8.5
  hjson==3.1.0
  pydantic==2.12.5
  pydantic-core==2.41.5
  annotated-types==0.7.0
  typing-inspection==0.4.2
  typing-extensions==4.15.0
)
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "${WHEELS[@]}"

# DeepSpeed publishes only a source distribution: build its pure-Python wheel here (no ops are
# compiled; DeepSpeed builds the ones it needs, CPU Adam, on first use there).
if ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
fi

ls -l "$DEST"
du -sh "$DEST"
