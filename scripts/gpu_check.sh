#!/usr/bin/env bash
# One-command accelerator check (train / DDP / features / predict / soup, ours beside upstream) -> runs/bench/GPU.md.
# On a GPU: bash scripts/gpu_check.sh ; smoke run on a CPU: bash scripts/gpu_check.sh --quick --device cpu
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
