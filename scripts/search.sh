#!/usr/bin/env bash
# Optuna search over train_clip.sh runs: bash scripts/search.sh --config configs/search/demo-cpu.yaml
# Many workers, one study: the same command with --storage postgresql://USER:PASSWORD@HOST/DB on each
# machine (README, step 3).
set -euo pipefail
exec python -m solution.search "$@"
