# The two set-up commands of the README: `make run` (install + demo) and `make test`.
#
#   make run     the runtime dependencies + the embedded Redis, then the demo
#   make test    + the `dev` and `flower` extras, then lint, type check and the whole suite
#   make bench   + the `bench` extra, then the benchmark
#
# Variables (make VAR=value ..., or in the environment):
#   PYTHON           the interpreter for .venv (3.11 or 3.12); default: the first of python3.11,
#                    python3.12, python3 whose version fits
#   TORCH_VARIANT    cpu (default) or cuda
#   TORCH_WHEEL      a local torch wheel file to install (cpu); default: this machine's
#                    /opt/wheels/torch-$(TORCH_VERSION)+cpu-*.whl when present; empty: none
#   TORCH_INDEX_URL  the index torch comes from when no source pip already knows has it;
#                    default: PyTorch's CPU index (cpu), none (cuda: PyPI's Linux wheels are
#                    CUDA builds), or e.g. https://download.pytorch.org/whl/cu128
PYTHON        ?=
VENV          ?= .venv
BIN            = $(VENV)/bin
TORCH_VERSION  = 2.13.0
TORCH_VARIANT ?= cpu
TORCH_WHEEL   ?= $(wildcard /opt/wheels/torch-$(TORCH_VERSION)+cpu-*.whl)
TORCH_INDEX_URL ?= $(if $(filter cuda,$(TORCH_VARIANT)),,https://download.pytorch.org/whl/cpu)
HASH          := $(shell (sha256sum 2>/dev/null || shasum -a 256 2>/dev/null) < pyproject.toml | cut -c1-12)
STAMP          = $(VENV)/.installed-$(HASH)
TORCH_STAMP    = $(VENV)/.torch-$(TORCH_VERSION)-$(TORCH_VARIANT)
SUPPORTED      = import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))

# What each entry point installs (pip extras of pyproject.toml).
EXTRAS_run   = embedded,onnx
EXTRAS_test  = embedded,onnx,flower,dev,tracing
EXTRAS_bench = embedded,onnx,bench

.PHONY: install install-dev run up test test-unit lint bench bench-quick chaos models clean

# A virtual environment from a supported Python.
$(BIN)/python:
	@py="$(PYTHON)"; \
	if [ -z "$$py" ]; then \
	  for candidate in python3.11 python3.12 python3; do \
	    if command -v $$candidate >/dev/null 2>&1 && $$candidate -c "$(SUPPORTED)" 2>/dev/null; then \
	      py=$$candidate; break; \
	    fi; \
	  done; \
	fi; \
	if [ -z "$$py" ]; then \
	  echo "modelworkers needs Python 3.11 or 3.12, and none of python3.11, python3.12, python3"; \
	  echo "is one. Install one (Debian/Ubuntu: apt install python3.11-venv; macOS: brew install"; \
	  echo "python@3.12; any system: pyenv install 3.12), or name it: make PYTHON=/path/to/python3.12"; \
	  exit 1; \
	fi; \
	if ! $$py -c "$(SUPPORTED)" 2>/dev/null; then \
	  echo "PYTHON=$$py is $$($$py -V 2>&1): modelworkers needs Python 3.11 or 3.12"; exit 1; \
	fi; \
	echo "creating $(VENV) with $$py ($$($$py -V 2>&1))"; \
	$$py -m venv $(VENV) || { echo "$$py cannot create a virtual environment (Debian/Ubuntu: apt install python3-venv)"; exit 1; }
	$(BIN)/pip install -q --upgrade pip

# torch first, so that the dependency pin `torch==2.13.0` is already satisfied by the build
# chosen here (a plain `pip install torch` on Linux pulls the multi-GB CUDA build from PyPI).
# cpu, in this order:
#   1. TORCH_WHEEL, a wheel file on disk for this Python (cpXY);
#   2. `torch==2.13.0+cpu` from the sources pip is already configured with (pip.conf, PIP_*
#      variables: a wheelhouse, a mirror). PyPI has no `+cpu` build, so this answers only where
#      such a source has one, e.g. an offline machine whose pip finds a local CPU wheel;
#   3. else `torch==2.13.0` from TORCH_INDEX_URL alone (PyTorch's CPU index, every platform).
# Steps 2 and 3 together work both offline with a local wheel and online with nothing set up.
# cuda: `torch==2.13.0` from PyPI (its Linux wheels are CUDA builds), plus TORCH_INDEX_URL when
# given (e.g. https://download.pytorch.org/whl/cu128 for another CUDA version).
$(TORCH_STAMP): | $(BIN)/python
	@set -e; \
	if [ "$(TORCH_VARIANT)" = cuda ]; then \
	  echo "torch $(TORCH_VERSION), CUDA build$(if $(TORCH_INDEX_URL), (also from $(TORCH_INDEX_URL)))"; \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)); \
	elif [ "$(TORCH_VARIANT)" = cpu ]; then \
	  tag=$$($(BIN)/python -c 'import sys; print("cp%d%d" % sys.version_info[:2])'); wheel=; \
	  for w in $(TORCH_WHEEL); do case "$$w" in *-$$tag-*) wheel=$$w; break;; esac; done; \
	  if [ -n "$$wheel" ]; then \
	    echo "torch $(TORCH_VERSION), CPU build, from $$wheel"; \
	    $(BIN)/pip install -q "$$wheel"; \
	  elif $(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" >$(VENV)/torch-install.log 2>&1; then \
	    echo "torch $(TORCH_VERSION)+cpu, CPU build, from pip's configured sources"; \
	  else \
	    echo "torch $(TORCH_VERSION), CPU build, from $(TORCH_INDEX_URL)"; \
	    $(BIN)/pip install -q "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX_URL)"; \
	  fi; \
	else \
	  echo "TORCH_VARIANT=$(TORCH_VARIANT): expected cpu or cuda"; exit 1; \
	fi
	@touch $@

$(STAMP)-%: pyproject.toml $(TORCH_STAMP)
	$(BIN)/pip install -q -e '.[$(EXTRAS_$*)]'
	@touch $@

install: $(STAMP)-run       ## the runtime dependencies and the embedded Redis
install-dev: $(STAMP)-test  ## + tests, lint, type check, Flower

run: install          ## install, then start an embedded Redis + workers and run the demo jobs
	$(BIN)/modelworkers demo

up: install           ## install, then run Redis (embedded unless MODELWORKERS_REDIS_URL) + a worker
	$(BIN)/modelworkers up

test: install-dev     ## install, then lint, type-check and run the whole suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

test-unit: install-dev  ## the tests that start no worker process (under a minute)
	$(BIN)/python -m pytest -m "not integration and not slow" -q

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: $(STAMP)-bench
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)-bench
	$(BIN)/python -m bench.run --quick

chaos: install-dev    ## every fault at once under a mixed load (about 5 minutes); exit 1 if a task is lost
	$(BIN)/python -m harness.chaos $(CHAOS_ARGS)   # e.g. CHAOS_ARGS="--broker amqp"

models: install-dev   ## rebuild every model artifact and the manifest from packaged data
	$(BIN)/python scripts/build_models.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
