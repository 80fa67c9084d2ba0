# The two set-up commands of the README: `make run` (install + demo) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))

.PHONY: install run up test test-unit lint bench bench-quick models clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (a plain `torch` from an index can be a multi-GB CUDA build).
	$(BIN)/pip install -q $(if $(TORCH_WHEEL),$(TORCH_WHEEL),torch==2.13.0)
	$(BIN)/pip install -q -e '.[dev,bench,tracing]'
	@touch $@

install: $(STAMP)

run: install          ## install, then start an embedded Redis + workers and run the demo jobs
	$(BIN)/modelworkers demo

up: install           ## install, then run Redis (embedded unless REDIS_URL) + a worker
	$(BIN)/modelworkers up

test: install         ## install, then lint, type-check and run the whole suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

test-unit: install    ## the tests that start no worker process (under a minute)
	$(BIN)/python -m pytest -m "not integration" -q

lint: install

	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: install
	$(BIN)/python -m bench.run

bench-quick: install
	$(BIN)/python -m bench.run --quick

models: install       ## rebuild every model artifact and the manifest from packaged data
	$(BIN)/python scripts/build_models.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
