# The two set-up commands of the README: `make demo` and `make test`.
# The virtual environment is reused while the pinned requirements in setup.cfg are unchanged:
# a fresh install of the stack takes minutes, a reused one about five seconds.
PY      ?= python3
# The environment lives outside the checkout, named by the hash of the pinned requirements, so a
# fresh clone (CI) reuses it: only the editable link to this tree is refreshed (about 5 s).
# Only the requirement lines count (install_requires and the extras): a new package in the
# `packages` list needs no new environment.
DEPS    := $(shell sed -n '/^install_requires/,/^\[options.entry_points\]/p' setup.cfg | sha256sum | cut -c1-16)
VENV    ?= $(HOME)/.cache/qwen-jax/venv-$(DEPS)
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.deps-installed
# libtpu is loaded only for ahead-of-time TPU compilation; these silence its host probing.
export JAX_PLATFORMS ?= cpu
export ALLOW_MULTIPLE_LIBTPU_LOAD ?= 1
export TPU_ACCELERATOR_TYPE ?= v5litepod-4
export TPU_WORKER_HOSTNAMES ?= localhost
export TF_CPP_MIN_LOG_LEVEL ?= 2
DEMO_DIR ?= runs/demo

.PHONY: install demo test lint format bench compile-full gpu-check clean

$(STAMP):
	rm -rf $(VENV) && mkdir -p $(dir $(VENV))
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,tpu,sweep]'
	touch $@

# Point the shared environment's editable install at this checkout.
install: $(STAMP)
	@$(BIN)/pip install -q --no-deps --no-build-isolation -e . > $(VENV)/develop.log 2>&1 \
	  || (cat $(VENV)/develop.log; exit 1)

# The short reproduction chain (`qwen-jax reproduce --out $(DEMO_DIR) --quick`): base, Code-Qwen,
# Code-Qwen-Chat, Math-Qwen-Chat, held-out evals; under 10 minutes on 2 cores, resumable.
demo: install
	$(BIN)/qwen-jax demo --workdir $(DEMO_DIR)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two pytest workers (the machines have 2 cores; a test is mostly single-threaded Python and
# XLA compiles), one file per worker at a time so module fixtures (servers, trained bases) are
# built once. PYTEST_ARGS= runs serially.
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=40
test: lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m benchmarks.run --out bench_results.json

# Full-depth, default-optimisation AOT compile of every full-size experiment (figures for
# WORKSPACE.md); the test suite runs a fast 2-layer variant of the same.
compile-full: install
	for f in experiments/pretrain/qwen_*.py experiments/sft/qwen_*.py experiments/rm/qwen_*.py \
	    experiments/dpo/qwen_*.py experiments/code/code_qwen_*.py experiments/math/math_qwen_*.py; \
	    do $(BIN)/qwen-jax compile --config=$$f || exit 1; done

# On a GPU machine: kernels without interpret mode, timed against XLA/cuDNN.
gpu-check: install
	$(BIN)/python scripts/gpu_check.py --out gpu_check.json

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
