#!/usr/bin/env bash
# Every performance benchmark, ours and upstream cn_clip side by side in one run on this machine
# (CPU; a GPU too when present), then runs/bench/BENCH.md. Pass --quick for a small smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/bench
mkdir -p "$out"
for b in prepare features predict train soup ensemble export; do
    echo "== bench_$b" >&2
    python "scripts/bench_$b.py" --out "$out/$b.json" "$@" || echo "bench_$b failed" >&2
done
exec python scripts/bench_summary.py "$out"
