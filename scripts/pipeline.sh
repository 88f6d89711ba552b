#!/usr/bin/env bash
# One recipe, the whole plan: bash scripts/pipeline.sh --config configs/pipeline/NAME.yaml [--data DIR] [--out DIR]
# [--set KEY=VALUE ...] [--dry-run]. Re-running resumes; every stage reuses what is done.
set -euo pipefail
exec python -m solution.pipeline "$@"
