"""Per-query retrieval hits and the statistics built on them: paired bootstrap and cross-fitting.

A query's hits are MUGE's: hit at K when any gold id is among its first K predictions. Its
per-query value is the mean of its hits at 1/5/10, ``v_q = (h1 + h5 + h10) / 3`` in [0, 1], so a
system's mean recall is ``100 * mean_q v_q``; :func:`mean_recall` computes that number with the
official arithmetic (from the hit counts per K), equal to :func:`solution.metrics.recall_at_k`'s
to the last digit, while ``100 * v.mean()`` can differ from it in the last bits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from solution.retrieval.metrics import per_query_recall

log = logging.getLogger(__name__)

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30; above 30 a Cornish-Fisher expansion.
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)
_Z975 = 1.959963984540054


def _values(x) -> np.ndarray:
    """Per-query values from values ``[Q]`` or hits ``[Q, J]``."""
    x = np.asarray(x)
    return per_query_recall(x) if x.ndim == 2 else x.astype(np.float64)


# ---------------------------------------------------------------- paired bootstrap


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """Mean-recall difference ``a - b`` in points of percent and its percentile interval."""

    diff: float
    low: float
    high: float
    significant: bool  # the interval excludes 0
    n_resamples: int
    ci: float


def paired_bootstrap(
    a_per_query, b_per_query, n_resamples: int = 1000, seed: int = 0, ci: float = 0.95, batch: int = 100
) -> BootstrapResult:
    """Paired bootstrap of ``100 * mean_q (a_q - b_q)`` over queries.

    Each resample draws ``Q`` query indices with replacement (``numpy.random.default_rng(seed)``)
    and applies the *same* indices to both systems; the interval is the ``(1 - ci) / 2`` and
    ``(1 + ci) / 2`` percentiles (``numpy.quantile``, linear) of the resampled differences. Inputs
    are per-query values ``[Q]`` or hits ``[Q, J]`` (see :func:`per_query_recall`). Identical
    systems give exactly ``diff = low = high = 0``.
    """
    a, b = _values(a_per_query), _values(b_per_query)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two non-empty per-query arrays of equal length, got {a.shape} and {b.shape}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    d = a - b
    n = len(d)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, batch):  # bounded memory: batch x Q indices at a time
        stop = min(start + batch, n_resamples)
        diffs[start:stop] = 100 * d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(diffs, [(1 - ci) / 2, (1 + ci) / 2]).tolist()
    diff = 100 * float(d.mean())
    out = BootstrapResult(diff, low, high, bool(low > 0 or high < 0), n_resamples, ci)
    log.info(
        "paired bootstrap: a - b = %.3f points, %g%% interval [%.3f, %.3f]%s",
        diff,
        100 * ci,
        low,
        high,
        " (significant)" if out.significant else "",
    )
    return out


# ---------------------------------------------------------------- cross-fitting


def kfold_crossfit(n_queries: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint folds of query indices covering ``range(n_queries)``: a seeded permutation split
    into sizes differing by at most one, each fold sorted."""
    if not 2 <= k <= n_queries:
        raise ValueError(f"need 2 <= k <= n_queries, got k={k} for {n_queries} queries")
    perm = np.random.default_rng(seed).permutation(n_queries)
    return [np.sort(f) for f in np.array_split(perm, k)]


def take(data, idx: np.ndarray):
    """Rows ``idx`` of per-query data: an array (axis 0), or a tuple / list / dict of such (each indexed)."""
    if isinstance(data, Mapping):
        return {key: take(v, idx) for key, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(take(v, idx) for v in data)
    return data[idx]


def _n_rows(data) -> int:
    if isinstance(data, Mapping):
        return _n_rows(next(iter(data.values())))
    if isinstance(data, (tuple, list)):
        return _n_rows(data[0])
    return len(data)


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student t quantile ``t_{0.975, df}`` (table to df 30, Cornish-Fisher above; error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclasses.dataclass
class CrossfitResult:
    """Held-out scores of a selection procedure: one per fold, their mean and a 95% t interval."""

    fold_scores: list[float]
    mean: float
    low: float
    high: float
    choices: list[Any]  # the choice made without each fold
    choice: Any  # the choice refit on all queries (what to ship)
    folds: list[np.ndarray]
    interval: str = "student-t 95% over fold scores"


def crossfit(
    select_fn: Callable[[Any], Any], score_fn: Callable[[Any, Any], float], per_query_data, k: int = 5, seed: int = 0
) -> CrossfitResult:
    """K-fold cross-fitting: for each fold, ``choice = select_fn(data without the fold)`` and
    ``score_fn(choice, data of the fold)``; then the choice refit on all queries.

    ``mean`` is the plain mean of the ``k`` fold scores ``s_i`` and the interval is
    ``mean +- t_{0.975, k-1} * sd(s, ddof=1) / sqrt(k)``. The folds share training queries, so the
    scores are not independent and the interval is approximate (optimistic; Bengio & Grandvalet 2004).
    """
    n = _n_rows(per_query_data)
    folds = kfold_crossfit(n, k, seed)
    scores, choices = [], []
    for i, test in enumerate(folds):
        train = np.sort(np.concatenate([f for j, f in enumerate(folds) if j != i]))
        choice = select_fn(take(per_query_data, train))
        scores.append(float(score_fn(choice, take(per_query_data, test))))
        choices.append(choice)
        log.info("fold %d/%d: %d held-out queries, score %.4f, choice %s", i + 1, k, len(test), scores[-1], choice)
    s = np.asarray(scores)
    mean = float(s.mean())
    half = t_quantile_975(k - 1) * float(s.std(ddof=1)) / math.sqrt(k)
    refit = select_fn(per_query_data)
    log.info("cross-fit: %.4f +- %.4f (95%% t over %d folds); refit choice %s", mean, half, k, refit)
    return CrossfitResult(scores, mean, mean - half, mean + half, choices, refit, folds)
