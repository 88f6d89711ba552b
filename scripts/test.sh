#!/usr/bin/env bash
# Install everything (CPU is enough) and run the checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test]'
lint-imports --no-cache   # the layering declared in pyproject.toml
ruff check .
ruff format --check .
python -m pytest -q "$@"
