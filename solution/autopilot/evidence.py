"""Choosing a submission by its cross-fitted estimate, and saying why.

Every candidate carries held-out per-query hits over the same valid queries and its held-out mean recall on
each of the same folds: a single model's are its plain hits (nothing was chosen on them); a soup's or an
ensemble's come from choices made without each fold. The estimate is the mean of the fold scores with a
Student t interval; differences between two candidates are paired bootstraps of their held-out hits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from solution.retrieval.metrics import recall_from_hits
from solution.stats import paired_bootstrap, t_interval

from .recipe import KINDS


@dataclasses.dataclass
class Candidate:
    name: str
    kind: str  # single | soup | ensemble
    source: str  # its checkpoint, or its ensemble.json
    valid_mr: float  # in-sample, on every valid query (the refit choice for soups and ensembles)
    fold_scores: list[float]  # held-out mean recall per fold
    hits: np.ndarray  # held-out hits [Q, 3] over the valid queries, in the shared query order
    info: dict = dataclasses.field(default_factory=dict)  # members, weights, re-ranker, ...
    test_mr: float | None = None

    @property
    def cv(self) -> tuple[float, float, float]:
        """``(mean, low, high)``: the fold scores' mean and its 95% t interval."""
        return t_interval(self.fold_scores)


def fold_scores(hits: np.ndarray, folds: list[np.ndarray]) -> list[float]:
    """Mean recall of each fold's rows of per-query hits (the official arithmetic)."""
    return [recall_from_hits(hits[f])["mean_recall"] for f in folds]


def rank_key(c: Candidate) -> tuple:
    """Best estimate first; equal estimates go to the simpler kind, then the name (a deterministic choice)."""
    return (-round(c.cv[0], 9), KINDS.index(c.kind), c.name)


def choose(cands: list[Candidate], submit: str = "best", prefer_simpler: bool = False) -> tuple[Candidate, list[str]]:
    """The candidate to submit and the sentences that say why (from the numbers)."""
    ranked = sorted(cands, key=rank_key)
    if submit != "best":
        chosen = next(c for c in cands if c.name == submit)
        return chosen, [f"Submitted {_label(chosen)} because the recipe names it (`submit: {submit}`)."]
    chosen, why = ranked[0], []
    if prefer_simpler:
        same = [c for c in ranked[1:] if not _differs(chosen, c) and KINDS.index(c.kind) < KINDS.index(chosen.kind)]
        if same:
            simpler = min(same, key=lambda c: (KINDS.index(c.kind), rank_key(c)))
            why.append(
                f"{_label(chosen)} has the best estimate, but {_label(simpler)} is not distinguishable from it "
                f"({_diff(simpler, chosen)}) and is simpler; the recipe asks for the simpler (`prefer_simpler`)."
            )
            chosen = simpler
    mean, low, high = chosen.cv
    place = "the best" if chosen is ranked[0] else f"number {ranked.index(chosen) + 1}"
    why.insert(
        0,
        f"Submitted {_label(chosen)}: cross-fitted mean recall {mean:.2f} [{low:.2f}, {high:.2f}], "
        f"{place} of {len(cands)} candidates.",
    )
    runner = next((c for c in ranked if c is not chosen), None)
    if runner is not None:
        why.append(f"Against the runner-up {_label(runner)}: {_diff(chosen, runner)}.")
    singles = [c for c in ranked if c.kind == "single"]
    if chosen.kind != "single" and singles and singles[0] is not runner:
        why.append(f"Against the best single model {_label(singles[0])}: {_diff(chosen, singles[0])}.")
    return chosen, why


def _label(c: Candidate) -> str:
    return f"**{c.name}** ({c.kind})"


def _differs(a: Candidate, b: Candidate) -> bool:
    return paired_bootstrap(a.hits, b.hits).significant


def _diff(a: Candidate, b: Candidate) -> str:
    r = paired_bootstrap(a.hits, b.hits)
    verdict = "a real difference" if r.significant else "not distinguishable (the interval holds 0)"
    return f"{r.diff:+.2f} points [{r.low:+.2f}, {r.high:+.2f}] on held-out per-query hits, {verdict}"
