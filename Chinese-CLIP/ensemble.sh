#!/usr/bin/env bash
# Fuse the scores of several checkpoints (any architecture) into an ensemble; see python -m solution.ensemble --help.
set -euo pipefail
exec python -m solution.ensemble "$@"
