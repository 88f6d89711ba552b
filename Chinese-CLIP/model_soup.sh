#!/usr/bin/env bash
# Average fine-tuned checkpoints into a soup (greedy | pairwise | uniform | model_stock); see python -m solution.soup --help.
set -euo pipefail
exec python -m solution.soup "$@"
