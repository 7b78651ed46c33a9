# Two commands do everything on a fresh machine: `make demo` and `make test`. Each creates the venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test test-all demo lint clean gpu-check

setup: $(STAMP)

# Reinstalled when pyproject.toml changes (the stamp is older), idempotent otherwise.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/prune-cli run recipes/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check prune_cli tests benchmarks

gpu-check: $(STAMP)
	bash benchmarks/gpu_check.sh

clean:
	rm -rf runs corpora data_manifests/demo data_manifests/ci_smoke .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
