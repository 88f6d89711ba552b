"""Statistics over per-query retrieval results: paired bootstrap and k-fold cross-fitting. A query's value is the
mean of its hits at 1/5/10, so a system's mean recall is ``100 * mean_q v_q`` (up to the official arithmetic's bits)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from solution.retrieval.metrics import per_query_recall, recall_from_hits

log = logging.getLogger(__name__)

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30; above 30 a Cornish-Fisher expansion.
# fmt: off
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
# fmt: on
_Z975 = 1.959963984540054


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
    """Paired bootstrap of ``100 * mean_q (a_q - b_q)`` from per-query values ``[Q]`` or hits ``[Q, J]``: each
    resample draws ``Q`` query indices with replacement (``default_rng(seed)``), the same for both systems; the
    interval is their ``(1 - ci) / 2`` and ``(1 + ci) / 2`` percentiles (``numpy.quantile``, linear)."""
    a, b = (np.asarray(x) for x in (a_per_query, b_per_query))
    a, b = (per_query_recall(x) if x.ndim == 2 else x.astype(np.float64) for x in (a, b))
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two non-empty per-query arrays of equal length, got {a.shape} and {b.shape}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    d, rng = a - b, np.random.default_rng(seed)
    diffs = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, batch):  # bounded memory: batch x Q indices at a time
        stop = min(start + batch, n_resamples)
        diffs[start:stop] = 100 * d[rng.integers(0, len(d), size=(stop - start, len(d)))].mean(axis=1)
    low, high = np.quantile(diffs, [(1 - ci) / 2, (1 + ci) / 2]).tolist()
    out = BootstrapResult(100 * float(d.mean()), low, high, bool(low > 0 or high < 0), n_resamples, ci)
    msg = "paired bootstrap: a - b = %.3f points, %g%% interval [%.3f, %.3f]%s"
    log.info(msg, out.diff, 100 * ci, low, high, " (significant)" if out.significant else "")
    return out


def kfold_crossfit(n_queries: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint sorted folds of query indices covering ``range(n_queries)``: a seeded permutation
    split into sizes differing by at most one."""
    if not 2 <= k <= n_queries:
        raise ValueError(f"need 2 <= k <= n_queries, got k={k} for {n_queries} queries")
    perm = np.random.default_rng(seed).permutation(n_queries)
    return [np.sort(f) for f in np.array_split(perm, k)]


def id_folds(ids, k: int, seed: int = 0) -> list[np.ndarray]:
    """:func:`kfold_crossfit` by query id: positions into ``ids`` per fold, the same id always in the same fold
    whatever the order of ``ids``, so every tool cross-fitting the same queries with one seed shares its folds."""
    order = np.argsort(np.asarray(ids), kind="stable")
    return [np.sort(order[f]) for f in kfold_crossfit(len(order), k, seed)]


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
    held_out: np.ndarray | None = None  # with hits from score_fn: each row's hits under the choice made without it


def t_interval(scores) -> tuple[float, float, float]:
    """``(mean, low, high)``: the scores' mean and its 95% t interval."""
    s = np.asarray(scores, dtype=np.float64)
    half = t_quantile_975(len(s) - 1) * float(s.std(ddof=1)) / math.sqrt(len(s))
    return float(s.mean()), float(s.mean()) - half, float(s.mean()) + half


def crossfit(
    select_fn: Callable[[Any], Any], score_fn: Callable[[Any, Any], Any], per_query, k: int = 5, seed: int = 0, ids=None
) -> CrossfitResult:
    """K-fold cross-fitting over the rows of ``per_query`` (:func:`id_folds` of ``ids`` when given): per fold
    ``score_fn(select_fn(rows without the fold), rows of the fold)`` (a mean recall, or per-query hits ``[n, 3]``
    collected in ``held_out``), then the choice refit on all rows. The interval, ``mean +- t_{0.975, k-1} * sd /
    sqrt(k)`` over the fold scores, is approximate: folds share training queries (Bengio & Grandvalet 2004)."""
    folds = kfold_crossfit(len(per_query), k, seed) if ids is None else id_folds(ids, k, seed)
    scores, choices, held_out = [], [], None
    for i, test in enumerate(folds):
        choices.append(select_fn(per_query[np.sort(np.concatenate(folds[:i] + folds[i + 1 :]))]))
        got = score_fn(choices[-1], per_query[test])
        if np.ndim(got) == 2:
            held_out = np.zeros((len(per_query), np.shape(got)[1]), bool) if held_out is None else held_out
            held_out[test], got = got, recall_from_hits(got)["mean_recall"]
        scores.append(float(got))
        log.info("fold %d/%d: %d held-out queries, score %.4f", i + 1, k, len(test), scores[-1])
    mean, low, high = t_interval(scores)
    refit = select_fn(per_query)
    log.info("cross-fit: %.4f +- %.4f (95%% t over %d folds)", mean, mean - low, k)
    return CrossfitResult(scores, mean, low, high, choices, refit, folds, held_out=held_out)
