#!/usr/bin/env bash
# Optuna search over train_clip.sh runs: bash scripts/search.sh --config configs/search/demo-cpu.yaml
set -euo pipefail
exec python -m solution.search "$@"
