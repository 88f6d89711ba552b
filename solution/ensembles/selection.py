"""Choosing an ensemble on held-out queries, each step kept only when it strictly helps.

:func:`select` fits the softmax normalisation's temperature with uniform weights, then the weights by
forward selection (or takes fixed ones), then tries flip test-time augmentation, then each re-ranker's
temperature on its grid (0 = off first). :func:`choose` adds ``--folds K`` cross-fitting
(:func:`solution.stats.crossfit`) and the refit on all selection queries. Every candidate tried is a record.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from solution.common import SolutionError
from solution.ensembles.fusion import TEMPERATURE_GRID, check_weights, fit_temperature, forward_select, rerank_topk
from solution.retrieval.metrics import KS, query_hits, recall_from_hits
from solution.stats import crossfit

log = logging.getLogger(__name__)

NORM_GRID = tuple(t for t in TEMPERATURE_GRID if t > 0)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A fused ranking: member weights, the normalisation, flip TTA or not, the re-ranker and its temperature."""

    weights: tuple
    norm: str = "zscore"
    norm_temperature: float = 1.0
    rerank: str = "none"
    temperature: float = 0.0
    tta: str = "none"

    def record(self) -> dict:
        return {
            "weights": [float(w) for w in self.weights],
            "norm": self.norm,
            "norm_temperature": self.norm_temperature if self.norm == "softmax" else None,
            "tta": self.tta,
            "rerank": {"method": self.rerank if self.temperature > 0 else "none", "temperature": self.temperature},
        }


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to choose: fixed ``weights`` or forward selection, the normalisation, what else to try."""

    norm: str = "zscore"
    weights: tuple | None = None
    rerankers: tuple = ()
    max_rounds: int = 20
    tta: tuple = ()  # test-time augmentations to try ("flip")


@dataclasses.dataclass
class Problem:
    """Members' query and gallery (and bank) features, the gold gallery indices of each query row, and each
    member's flip-TTA gallery (:func:`solution.ensembles.members.flip_average`)."""

    queries: Sequence[np.ndarray]
    galleries: Sequence[np.ndarray]
    gold: Sequence[set]
    banks: Sequence[np.ndarray] | None = None
    device: str = "cpu"
    bank_topk: int | None = None
    flipped: Sequence[np.ndarray] | None = None

    @property
    def n_members(self) -> int:
        return len(self.queries)

    def alone(self, i: int) -> Choice:
        """Member ``i`` alone, as its own features rank."""
        return Choice(tuple(np.eye(self.n_members)[i].tolist()), "none")

    def ranked(self, choice: Choice, rows: np.ndarray) -> np.ndarray:
        """Top-10 gallery indices of ``rows`` under ``choice`` (dual softmax's bank: these rows themselves)."""
        if choice.tta == "flip" and self.flipped is None:
            raise SolutionError("flip TTA asked but no flipped gallery features were encoded")
        galleries = self.flipped if choice.tta == "flip" else self.galleries
        qb = choice.rerank == "qb_norm" and choice.temperature > 0
        _, idx = rerank_topk(
            [(q[rows], g) for q, g in zip(self.queries, galleries)],
            min(max(KS), len(galleries[0])),
            np.asarray(choice.weights),
            method=choice.rerank,
            temperature=choice.temperature,
            bank=list(zip(self.banks, galleries)) if qb else None,
            bank_topk=self.bank_topk,
            norm=choice.norm,
            norm_temperature=choice.norm_temperature,
            device=self.device,
        )
        return idx

    def hits(self, choice: Choice, rows) -> tuple[np.ndarray, np.ndarray]:
        """``(rows scored, their hits [n, 3])``: the rows with a gold image in the gallery, ranked among ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        scored = np.asarray([i for i, r in enumerate(rows.tolist()) if self.gold[r]], dtype=np.int64)
        if not len(scored):
            raise SolutionError(f"an empty query set: none of the {len(rows)} queries has a gold image in the gallery")
        idx = self.ranked(choice, rows)[scored]
        return rows[scored], query_hits(idx, [self.gold[r] for r in rows[scored].tolist()])

    def recall(self, choice: Choice, rows) -> dict:
        """MUGE R@1/5/10 and mean recall (percent) of ``rows`` (queries without a gold image not scored)."""
        scored, hits = self.hits(choice, rows)
        return {**recall_from_hits(hits), "queries_scored": len(scored)}

    def score(self, choice: Choice, rows) -> float:
        return float(self.recall(choice, rows)["mean_recall"])


def select(
    problem: Problem, rows: np.ndarray, plan: Plan, records: list, tag: dict | None = None
) -> tuple[Choice, float]:
    """The choice made on ``rows`` and its score there; a record per candidate goes to ``records``."""
    tag = tag or {}
    n = problem.n_members
    choice = Choice(tuple(np.full(n, 1.0 / n).tolist()), plan.norm)
    if plan.norm == "softmax":
        t, recs = fit_temperature(
            lambda t: problem.score(dataclasses.replace(choice, norm_temperature=t), rows), NORM_GRID
        )
        records.extend({**tag, "stage": "norm_temperature", **r, "accepted": r["temperature"] == t} for r in recs)
        choice = dataclasses.replace(choice, norm_temperature=t)
    if plan.weights is not None:
        choice = dataclasses.replace(choice, weights=tuple(check_weights(plan.weights, n).tolist()))
        score = problem.score(choice, rows)
        records.append({**tag, "stage": "weights", "weights": list(choice.weights), "score": score, "accepted": True})
    else:
        sel = forward_select(
            lambda w: problem.score(dataclasses.replace(choice, weights=tuple(w.tolist())), rows),
            n,
            max_rounds=plan.max_rounds,
        )
        for r in sel.trajectory:
            records.append(
                {**tag, "stage": "weights", **r, "weights": (np.asarray(r["counts"]) / sum(r["counts"])).tolist()}
            )
        choice, score = dataclasses.replace(choice, weights=tuple(sel.weights.tolist())), sel.score
    for tta in plan.tta:
        s = problem.score(dataclasses.replace(choice, tta=tta), rows)
        records.append({**tag, "stage": "tta", "method": tta, "score": s, "accepted": s > score})
        if s > score:
            choice, score = dataclasses.replace(choice, tta=tta), s
    best = (choice, score)
    for method in plan.rerankers:
        t, recs = fit_temperature(
            lambda t: problem.score(dataclasses.replace(choice, rerank=method, temperature=t), rows)
        )
        top = max(r["score"] for r in recs)
        for r in recs:
            records.append(
                {**tag, "stage": "rerank", "method": method, **r, "accepted": top > best[1] and r["temperature"] == t}
            )
        if top > best[1]:
            best = (dataclasses.replace(choice, rerank=method, temperature=t), top)
    log.info(f"{f'{tag} ' if tag else ''}choice {best[0].record()}: {best[1]:.4f} on {len(rows)} queries")
    return best


def choose(problem: Problem, rows: np.ndarray, plan: Plan, folds: int | None, seed: int, records: list):
    """``(choice on all rows, its score there, cross-fit summary or None)``."""
    if not folds:
        return (*select(problem, rows, plan, records), None)
    if not 2 <= folds <= len(rows):
        raise SolutionError(f"--folds {folds}: need 2 <= K <= {len(rows)} (the selection queries)")
    scores = []

    def select_fn(part: np.ndarray) -> Choice:
        choice, score = select(problem, part, plan, records, {"fold": len(scores) if len(scores) < folds else "refit"})
        scores.append(score)
        return choice

    r = crossfit(select_fn, problem.score, np.asarray(rows), k=folds, seed=seed)
    summary = {
        "folds": folds,
        "seed": seed,
        **{k: getattr(r, k) for k in ("fold_scores", "mean", "low", "high", "interval")},
    }
    return r.choice, scores[-1], {**summary, "choices": [c.record() for c in r.choices]}
