"""Choosing an ensemble on held-out queries, each step kept only when it strictly helps.

:func:`select` fits the softmax normalisation's temperature with uniform weights, then the weights by forward
selection (or takes fixed ones), then tries flip TTA, then each re-ranker's temperature on its grid (0 = off
first). :func:`choose` adds ``--folds K`` cross-fitting. Every candidate tried is a record.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np

from solution.common import SolutionError
from solution.ensembles.fusion import DEFAULT_CHUNK, TEMPERATURE_GRID, check_weights, rerank_topk
from solution.retrieval.metrics import KS, query_hits, recall_from_hits
from solution.stats import crossfit

log = logging.getLogger(__name__)

NORM_GRID = tuple(t for t in TEMPERATURE_GRID if t > 0)


def forward_select(evaluate: Callable[[np.ndarray], float], n_members: int, *, max_rounds: int = 20):
    """Caruana et al. (2004) greedy forward selection with replacement maximising ``evaluate(weights)``: ``(counts,
    score, a record per candidate)``. Round 0 takes the best single member (ties: the lower index); each later round
    adds the best member if that strictly improves the score; proportional counts are evaluated once."""
    cache: dict[tuple, float] = {}
    trajectory: list[dict] = []
    counts, best_score, best = np.zeros(n_members, dtype=np.int64), -math.inf, None
    for rnd in range(max_rounds + 1):
        for m in range(n_members):
            trial = counts.copy()
            trial[m] += 1
            key = tuple((trial // math.gcd(*trial.tolist())).tolist())
            if key not in cache:
                cache[key] = float(evaluate(trial / trial.sum()))
            trajectory.append({"round": rnd, "member": m, "counts": trial.tolist(), "score": cache[key]})
            trajectory[-1]["accepted"] = False
            if cache[key] > best_score:  # strict: ties keep the lower member, and a round must improve
                best_score, best = cache[key], trajectory[-1]
        if best is None or best["round"] != rnd:
            break
        best["accepted"] = True
        counts[best["member"]] += 1
        log.info(f"forward selection round {rnd}: + member {best['member']} -> {best_score:.4f} ({counts.tolist()})")
    return counts, best_score, trajectory


def fit_temperature(evaluate: Callable[[float], float], grid: Sequence[float] = TEMPERATURE_GRID):
    """``argmax_T evaluate(T)`` over ``grid`` (ties: the earliest value) and a record per value."""
    records = [{"temperature": float(t), "score": float(evaluate(float(t)))} for t in grid]
    best = max(records, key=lambda r: r["score"])  # max keeps the first of equal scores
    return best["temperature"], records


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
    """Members' query, gallery (and bank, flipped gallery) features, and the gold gallery indices of each query."""

    queries: Sequence[np.ndarray]
    galleries: Sequence[np.ndarray]
    gold: Sequence[set]
    banks: Sequence[np.ndarray] | None = None
    device: str = "cpu"
    bank_topk: int | None = None
    flipped: Sequence[np.ndarray] | None = None

    @classmethod
    def of(cls, members: Sequence, query_ids, gold: dict, **kw) -> Problem:
        """Encoded members (:class:`~.spec.Member`) and the gold gallery rows of queries ``{id: [gallery ids]}``."""
        where = {int(g): i for i, g in enumerate(members[0].gallery_ids.tolist())}
        rows = [{where[int(g)] for g in gold[int(q)] if int(g) in where} for q in query_ids]
        banks = [m.bank for m in members] if members[0].bank is not None else None
        flipped = [m.flipped for m in members] if members[0].flipped is not None else None
        return cls([m.queries for m in members], [m.gallery for m in members], rows, banks, flipped=flipped, **kw)

    def alone(self, i: int) -> Choice:
        """Member ``i`` alone, as its own features rank."""
        return Choice(tuple(np.eye(len(self.queries))[i].tolist()), "none")

    def ranked(self, choice: Choice, rows, k: int = max(KS), chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
        """Top-``k`` gallery indices of ``rows`` under ``choice`` (dual softmax's bank: these rows themselves)."""
        if choice.tta == "flip" and self.flipped is None:
            raise SolutionError("flip TTA asked but no flipped gallery features were encoded")
        galleries = self.flipped if choice.tta == "flip" else self.galleries
        qb = choice.rerank == "qb_norm" and choice.temperature > 0
        return rerank_topk(
            [(q[rows], g) for q, g in zip(self.queries, galleries)],
            min(k, len(galleries[0])),
            np.asarray(choice.weights),
            method=choice.rerank,
            temperature=choice.temperature,
            bank=list(zip(self.banks, galleries)) if qb else None,
            bank_topk=self.bank_topk,
            norm=choice.norm,
            norm_temperature=choice.norm_temperature,
            chunk_size=chunk_size,
            device=self.device,
        )[1]

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


def select(problem: Problem, rows, plan: Plan, records: list, tag: dict | None = None) -> tuple[Choice, float]:
    """The choice made on ``rows`` and its score there; a record per candidate goes to ``records``."""
    n = len(problem.queries)

    def score(**changes) -> float:
        return problem.score(dataclasses.replace(choice, **changes), rows)

    def note(stage: str, accepted: bool, **record) -> None:
        records.append({**(tag or {}), "stage": stage, **record, "accepted": accepted})

    choice = Choice(tuple(np.full(n, 1.0 / n).tolist()), plan.norm)
    if plan.norm == "softmax":
        t, recs = fit_temperature(lambda t: score(norm_temperature=t), NORM_GRID)
        for r in recs:
            note("norm_temperature", r["temperature"] == t, **r)
        choice = dataclasses.replace(choice, norm_temperature=t)
    if plan.weights is not None:
        choice = dataclasses.replace(choice, weights=tuple(check_weights(plan.weights, n).tolist()))
        best = score()
        note("weights", True, weights=list(choice.weights), score=best)
    else:
        counts, best, trajectory = forward_select(
            lambda w: score(weights=tuple(w.tolist())), n, max_rounds=plan.max_rounds
        )
        for r in trajectory:
            note("weights", r.pop("accepted"), **r, weights=(np.asarray(r["counts"]) / sum(r["counts"])).tolist())
        choice = dataclasses.replace(choice, weights=tuple((counts / counts.sum()).tolist()))
    for tta in plan.tta:
        s = score(tta=tta)
        note("tta", s > best, method=tta, score=s)
        if s > best:
            choice, best = dataclasses.replace(choice, tta=tta), s
    chosen = choice
    for method in plan.rerankers:
        t, recs = fit_temperature(lambda t: score(rerank=method, temperature=t))
        top = max(r["score"] for r in recs)
        for r in recs:
            note("rerank", top > best and r["temperature"] == t, method=method, **r)
        if top > best:
            chosen, best = dataclasses.replace(choice, rerank=method, temperature=t), top
    log.info(f"{tag or ''} choice {chosen.record()}: {best:.4f} on {len(rows)} queries")
    return chosen, best


def choose(problem: Problem, rows, plan: Plan, folds: int | None, seed: int, records: list, ids=None):
    """``(choice on all rows, its score there, cross-fit record or None, held-out hits or None)``. With ``folds``,
    the rows with a gold image are cross-fitted in :func:`solution.stats.id_folds` of their ``ids``."""
    if not folds:
        return (*select(problem, rows, plan, records), None, None)
    rows = np.asarray([r for r in np.asarray(rows).tolist() if problem.gold[r]], dtype=np.int64)
    if not 2 <= folds <= len(rows):
        raise SolutionError(f"--folds {folds}: need 2 <= K <= {len(rows)} (the selection queries)")
    scores: list = []

    def select_fn(part: np.ndarray) -> Choice:
        choice, score = select(problem, part, plan, records, {"fold": len(scores) if len(scores) < folds else "refit"})
        scores.append(score)
        return choice

    ids = rows if ids is None else np.asarray(ids)[rows]
    r = crossfit(select_fn, lambda c, part: problem.hits(c, part)[1], rows, k=folds, seed=seed, ids=ids)
    record = {"folds": folds, "seed": seed, **{k: getattr(r, k) for k in ("fold_scores", "mean", "low", "high")}}
    record.update(interval=r.interval, choices=[c.record() for c in r.choices])
    return r.choice, scores[-1], record, (ids, r.held_out)
