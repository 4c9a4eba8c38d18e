#!/usr/bin/env bash
# make gpu-check: every GPU figure of the project in one run (see benchmarks/gpu_check.py).
# From a clean checkout: installs what is missing (make setup), then writes
# gpu-check/gpu_check.json and gpu-check/gpu_check.md. Extra arguments go to the driver,
# e.g. `bash benchmarks/gpu_check.sh --out /tmp/gc` (python -m benchmarks gpu-check --help).
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup
exec .venv/bin/python -m benchmarks gpu-check "$@"
