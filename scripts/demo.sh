#!/usr/bin/env bash
# Install everything and run the demo: synthetic data in MUGE layout, then the demo recipe's whole plan on CPU
# (configs/pipeline/demo.yaml) -> runs/demo/REPORT.md, candidates.csv, submission.jsonl.
# Re-running resumes: each stage reuses what is already done. Flags go to python -m solution.pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e .
[ -f runs/demo/data/test_answers.jsonl ] || python -m solution.demo_data --out runs/demo/data
exec python -m solution.pipeline --config configs/pipeline/demo.yaml --out runs/demo "$@"
