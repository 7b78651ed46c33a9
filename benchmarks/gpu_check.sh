#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine: the gpu-marked tests, then a CUDA profile of the
# ci_smoke pipeline (CUDA events) whose summary is printed for the README. Expects `make setup` to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$BIN/python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt"
$BIN/prune-cli run ci_smoke --run-dir runs/gpu_smoke --device cuda --quiet
$BIN/prune-cli profile ci_smoke --run-dir runs/gpu_smoke --device cuda --json --quiet \
  --set 'profile.batch_sizes=[1,8,32]' --set profile.repeats=20 > "$OUT/profile_cuda.json"
$BIN/python benchmarks/pruning_ratios.py runs/gpu_smoke | tee "$OUT/ratios.md"
