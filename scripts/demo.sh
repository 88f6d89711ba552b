#!/usr/bin/env bash
# Install everything and run the whole flow on the demo data (CPU, about 5 min on 2 cores):
# demo data -> prepare -> base model -> search -> fine-tunes -> soups -> submission -> score -> REPORT.md
# Re-running resumes: each stage reuses what is already done. Flags go to python -m solution.demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e .
exec python -m solution.demo "$@"
