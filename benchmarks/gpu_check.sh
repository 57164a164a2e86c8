#!/usr/bin/env bash
# The GPU check in one call: install with the README command (CUDA wheels: no -c constraints.txt),
# then the GPU tests, the scoring benchmarks and an end-to-end slide, printed as one table
# (benchmarks/gpu_check.py). Without CUDA it runs a small CPU fallback and says so.
#
#   bash benchmarks/gpu_check.sh              # install into .venv, then the check (< 8 min on a GPU node)
#   GPU_CHECK_INSTALL=0 bash benchmarks/gpu_check.sh      # use the existing .venv as is
#   bash benchmarks/gpu_check.sh --dry-run    # print the steps only
#   bash benchmarks/gpu_check.sh --cpu        # the CPU fallback even on a GPU node
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GPU_CHECK_VENV:-.venv}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-480}"
if [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
  # The README's install, minus the CPU-wheel pins.
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q -e ".[all]"
fi
exec timeout "$LIMIT_S" "$VENV/bin/python" benchmarks/gpu_check.py "$@"
