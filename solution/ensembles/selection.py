"""Choosing an ensemble on held-out queries: normalisation, weights, and a re-ranker only when it helps.

Each member contributes a ``[Q, G]`` score matrix (its query features against its own gallery
features). :func:`select` makes the choice on a set of query rows with :mod:`solution.ensembles.fusion`:
the softmax normalisation's temperature (fitted with uniform weights), the weights by Caruana's forward
selection with replacement (or fixed by hand), flip test-time augmentation of the image features (kept
only when it strictly beats the score without it), then each re-ranker's temperature on its grid (0 = off
first); a re-ranker is kept only when it strictly beats the fused score without it. :func:`choose`
adds the ``--folds K`` cross-fitting (:func:`solution.stats.crossfit`) and the refit on all
selection queries. Every candidate tried becomes one log record.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from solution.common import SolutionError
from solution.ensembles.fusion import TEMPERATURE_GRID, check_weights, fit_temperature, forward_select, rerank_topk
from solution.retrieval.metrics import KS, recall_at_k
from solution.stats import crossfit

log = logging.getLogger(__name__)

NORM_GRID = tuple(t for t in TEMPERATURE_GRID if t > 0)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A fused ranking: member weights, the normalisation, and the re-ranker with its temperature."""

    weights: tuple
    norm: str = "zscore"
    norm_temperature: float = 1.0
    rerank: str = "none"
    temperature: float = 0.0
    tta: str = "none"  # test-time augmentation of the image features: none | flip

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
    """What to choose: fixed ``weights`` or forward selection, the normalisation, the re-rankers to try."""

    norm: str = "zscore"
    weights: tuple | None = None
    rerankers: tuple = ()
    max_rounds: int = 20
    bank_topk: int | None = None
    tta: tuple = ()  # test-time augmentations to try ("flip")


class Problem:
    """Members' query and gallery (and bank) features with the gold gallery indices of each query row;
    ``flipped``: each member's flip-TTA gallery (:func:`solution.ensembles.members.flip_average`)."""

    def __init__(
        self,
        queries: Sequence[np.ndarray],
        galleries: Sequence[np.ndarray],
        gold: Sequence[set],
        banks: Sequence[np.ndarray] | None = None,
        *,
        device="cpu",
        bank_topk: int | None = None,
        flipped: Sequence[np.ndarray] | None = None,
    ):
        self.queries, self.galleries, self.gold = list(queries), list(galleries), list(gold)
        self.banks = list(banks) if banks is not None else None
        self.flipped = list(flipped) if flipped is not None else None
        self.device, self.bank_topk = device, bank_topk
        self.k = min(max(KS), self.galleries[0].shape[0])

    @property
    def n_members(self) -> int:
        return len(self.queries)

    def ranked(self, choice: Choice, rows: np.ndarray) -> np.ndarray:
        """Top-k gallery indices of ``rows`` under ``choice`` (dual softmax's bank: these rows themselves)."""
        if choice.tta == "flip" and self.flipped is None:
            raise SolutionError("flip TTA asked but no flipped gallery features were encoded")
        galleries = self.flipped if choice.tta == "flip" else self.galleries
        members = [(q[rows], g) for q, g in zip(self.queries, galleries)]
        bank = None
        if choice.rerank == "qb_norm" and choice.temperature > 0:
            bank = [(b, g) for b, g in zip(self.banks, galleries)]
        _, idx = rerank_topk(
            members,
            self.k,
            np.asarray(choice.weights),
            method=choice.rerank,
            temperature=choice.temperature,
            bank=bank,
            bank_topk=self.bank_topk,
            norm=choice.norm,
            norm_temperature=choice.norm_temperature,
            device=self.device,
        )
        return idx

    def recall(self, choice: Choice, rows) -> dict:
        """MUGE R@1/5/10 and mean recall (percent) of ``rows`` (queries without a gold image not scored)."""
        rows = np.asarray(rows, dtype=np.int64)
        gold = {int(r): self.gold[r] for r in rows.tolist() if self.gold[r]}
        if not gold:
            raise SolutionError(f"an empty query set: none of the {len(rows)} queries has a gold image in the gallery")
        idx = self.ranked(choice, rows)
        preds = {int(r): idx[i].tolist() for i, r in enumerate(rows.tolist())}
        return {**recall_at_k(preds, gold), "queries_scored": len(gold)}

    def score(self, choice: Choice, rows) -> float:
        return float(self.recall(choice, rows)["mean_recall"])


def select(
    problem: Problem, rows: np.ndarray, plan: Plan, records: list, tag: dict | None = None
) -> tuple[Choice, float]:
    """The choice made on ``rows`` and its score there; a record per candidate goes to ``records``."""
    tag = tag or {}
    n = problem.n_members
    uniform = tuple(np.full(n, 1.0 / n).tolist())
    choice = Choice(uniform, plan.norm)
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
        records.extend(
            {**tag, "stage": "weights", **r, "weights": (np.asarray(r["counts"]) / sum(r["counts"])).tolist()}
            for r in sel.trajectory
        )
        choice, score = dataclasses.replace(choice, weights=tuple(sel.weights.tolist())), sel.score
    for tta in plan.tta:
        trial = dataclasses.replace(choice, tta=tta)
        s = problem.score(trial, rows)
        records.append({**tag, "stage": "tta", "method": tta, "score": s, "accepted": s > score})
        if s > score:  # strictly better only
            choice, score = trial, s
    best = (choice, score)
    for method in plan.rerankers:
        t, recs = fit_temperature(
            lambda t: problem.score(dataclasses.replace(choice, rerank=method, temperature=t), rows)
        )
        top = max(r["score"] for r in recs)
        keep = top > best[1]
        records.extend(
            {**tag, "stage": "rerank", "method": method, **r, "accepted": bool(keep and r["temperature"] == t)}
            for r in recs
        )
        if keep:
            best = (dataclasses.replace(choice, rerank=method, temperature=t), top)
    log.info("%schoice %s: %.4f on %d queries", f"{tag} " if tag else "", best[0].record(), best[1], len(rows))
    return best


def choose(
    problem: Problem, rows: np.ndarray, plan: Plan, folds: int | None, seed: int, records: list
) -> tuple[Choice, float, dict | None]:
    """``(choice on all rows, its score there, cross-fit summary or None)``."""
    if not folds:
        choice, score = select(problem, rows, plan, records)
        return choice, score, None
    if not 2 <= folds <= len(rows):
        raise SolutionError(f"--folds {folds}: need 2 <= K <= {len(rows)} (the selection queries)")
    calls = []

    def select_fn(part: np.ndarray) -> Choice:
        tag = {"fold": len(calls)} if len(calls) < folds else {"fold": "refit"}
        calls.append(part)
        choice, score = select(problem, part, plan, records, tag)
        calls[-1] = score
        return choice

    result = crossfit(select_fn, lambda c, part: problem.score(c, part), np.asarray(rows), k=folds, seed=seed)
    summary = {
        "folds": folds,
        "seed": seed,
        "fold_scores": result.fold_scores,
        "mean": result.mean,
        "low": result.low,
        "high": result.high,
        "interval": result.interval,
        "choices": [c.record() for c in result.choices],
    }
    return result.choice, float(calls[-1]), summary
