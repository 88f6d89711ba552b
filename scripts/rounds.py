"""Timings of interleaved rounds: the median ratio over rounds and its spread, warned of when wide."""

from __future__ import annotations

import logging
import statistics

log = logging.getLogger("bench")

SPREAD_WARN = 0.20


def ratio_summary(what: str, ours: list[float], reference: list[float]) -> dict:
    """``reference / ours`` of each round (above 1: ours is faster), their median, and their spread (max - min
    over the median); a warning when the spread is wider than 20% (a busy or drifting machine: run again)."""
    ratios = [r / o for o, r in zip(ours, reference)]
    median = statistics.median(ratios)
    spread = (max(ratios) - min(ratios)) / median
    if spread > SPREAD_WARN:
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        log.warning(f"{what}: the ratio varies by {100 * spread:.0f}% over {len(ratios)} rounds ({listed}); rerun")
    return {"median_ratio": median, "spread": spread, "ratios": ratios}
