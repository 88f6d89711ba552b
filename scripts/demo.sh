#!/usr/bin/env bash
# Install everything and run the whole flow on the demo data (CPU: about 12 CPU-minutes, one thread;
# 23 min wall when measured on 2 cores shared with other jobs):
# demo data -> prepare -> base model -> search -> fine-tunes -> soups -> other members -> submissions ->
# score -> ensembles + re-ranking -> REPORT.md (every row with its paired-bootstrap interval)
# Re-running resumes: each stage reuses what is already done. Flags go to python -m solution.demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e .
exec python -m solution.demo "$@"
