"""Soup methods over scored ingredients: greedy, pairwise, uniform, and interpolation with a base.

- :func:`greedy` (model soups, Wortsman et al. 2022): best first; add each next ingredient as a
  running average and keep it only if mean recall strictly improves.
- :func:`pairwise` (the Tianchi recipe): average the two best of the pool; a merge that beats the
  worse of them replaces it (saved as ``merged_round{N}.pt``), else the search ends.
- :func:`uniform`: the plain average of all.
- :func:`interpolate`: ``alpha * soup + (1 - alpha) * base`` for each alpha; the soup (alpha 1) wins ties.

A candidate's weights are built only when its score is not cached or it is kept; at most a few fp32
states are held at a time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from solution.common import write_jsonl
from solution.model import ModelConfig, save_checkpoint
from solution.model.precision import dtype_name
from solution.retrieval.metrics import RECALL_KEYS

from . import LOG
from .ingredients import Ingredient
from .weights import Source, State, flatten, mix, recipe_key, weights_of

log = logging.getLogger(__name__)

METHODS = ("greedy", "pairwise", "uniform")


@dataclasses.dataclass
class Soup:
    method: str
    key: str
    members: dict  # path -> weight, over the original checkpoints
    score: dict | None
    source: Source  # the weights: a path or an fp32 state (not yet rounded)
    extra: dict = dataclasses.field(default_factory=dict)


def fmt_recall(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def log_row(method: str, rnd: int, members: dict, score: dict | None, kept: bool, **extra) -> dict:
    """One ``soup_log.jsonl`` line (scores of the selection part; ``report``/``all``: the other part, all queries)."""
    score = score or {}
    row = {
        "method": method,
        "round": rnd,
        "members": list(members),
        "weights": [float(w) for w in members.values()],
        **{k: score.get(k) for k in RECALL_KEYS},
        "kept": bool(kept),
        **{k: score[k] for k in ("report", "all", "cached", "hits") if score.get(k)},
        **extra,
    }
    log.info(
        "%s round %d: %d members, mean recall %s%s -> %s",
        method,
        rnd,
        len(members),
        fmt_recall(score.get("mean_recall")),
        " (cached)" if score.get("cached") else "",
        "kept" if kept else "dropped",
    )
    return row


class Candidates:
    """What the methods share: the soup's tensors and dtype, the scorer (None: nothing is scored) and
    the running method's log (``soup_log.jsonl`` in ``folder``)."""

    def __init__(self, config: ModelConfig, template: dict, dtype: torch.dtype, scorer):
        self.config, self.template, self.dtype, self.scorer = config, template, dtype, scorer
        self.folder, self.rows = Path("."), []

    def start(self, folder: Path, rows: Sequence[dict]) -> None:
        self.folder, self.rows = folder, list(rows)
        folder.mkdir(parents=True, exist_ok=True)

    def record(self, method: str, rnd: int, members: dict, score: dict | None, kept: bool, **extra) -> None:
        self.rows.append(log_row(method, rnd, members, score, kept, **extra))
        write_jsonl(self.folder / LOG, self.rows)

    def mix(self, terms, buf: State | None = None) -> State:
        return mix(terms, self.template, buf)

    def score(self, terms, buf: State | None = None) -> tuple[str, dict | None, State | None]:
        """Key, score and weights of ``sum(w * term)``; the weights are built (into ``buf``) only when the
        score is not cached, else None."""
        key = recipe_key(terms, dtype_name(self.dtype))
        hit = self.scorer.cached(key) if self.scorer else None
        if hit is not None:
            return key, hit, None
        state = self.mix(terms, buf)
        return key, self.scorer.score(key, state) if self.scorer else None, state

    def save(self, path: Path, soup: Soup) -> Path:
        """Write ``soup`` in the soup dtype with its recipe; an in-memory state is converted in place."""
        state = soup.source if isinstance(soup.source, dict) else dict(weights_of(soup.source))
        for k, t in state.items():
            if t.is_floating_point():
                state[k] = t.to(self.dtype)
        recipe = {"method": soup.method, "members": list(soup.members), "weights": list(soup.members.values())}
        recipe.update(soup.extra)
        if soup.score:
            recipe.update(score={k: soup.score.get(k) for k in RECALL_KEYS}, report=soup.score.get("report"))
            recipe["all"] = soup.score.get("all")
        tuning = dict(self.config.tuning or {})
        if tuning.get("mode") == "lora":
            tuning["merged"] = True
        save_checkpoint(path, state, dataclasses.replace(self.config, tuning=tuning), name=path.stem, recipe=recipe)
        log.info("wrote %s", path)
        return path


def greedy(ings: Sequence[Ingredient], c: Candidates) -> Soup:
    order = sorted(ings, key=lambda i: (-i.score["mean_recall"], i.path))
    soup = Soup("greedy", order[0].key, {order[0].path: 1.0}, order[0].score, c.mix([(order[0], 1.0)]))
    c.record("greedy", 0, soup.members, soup.score, True)
    spare = None  # candidates are built here; a kept one swaps buffers with the soup
    for rnd, ing in enumerate(order[1:], 1):
        n = len(soup.members)
        terms = [(soup, n / (n + 1)), (ing, 1 / (n + 1))]
        key, score, state = c.score(terms, spare)
        spare = spare if state is None else state
        members = {**{p: w * n / (n + 1) for p, w in soup.members.items()}, ing.path: 1 / (n + 1)}
        kept = score["mean_recall"] > soup.score["mean_recall"]
        c.record("greedy", rnd, members, score, kept)
        if kept:
            state = state if state is not None else c.mix(terms, spare)
            soup.source, spare = state, soup.source
            soup.key, soup.members, soup.score = key, members, score
    return soup


def _label(s: Soup) -> str:
    return s.source if isinstance(s.source, str) else f"<{s.method}>"


def pairwise(ings: Sequence[Ingredient], c: Candidates, max_rounds: int) -> Soup:
    pool = [Soup("pairwise", i.key, {i.path: 1.0}, i.score, i.path) for i in ings]
    for rnd in range(1, max_rounds + 1):
        if len(pool) < 2:
            break
        pool.sort(key=lambda s: (-s.score["mean_recall"], _label(s)))
        a, b = pool[0], pool[1]
        terms = [(a, 0.5), (b, 0.5)]
        key, score, state = c.score(terms)
        members = flatten([(a.members, 0.5), (b.members, 0.5)])
        kept = score["mean_recall"] > b.score["mean_recall"]
        pair = {"pair": [_label(a), _label(b)], "pair_scores": [a.score["mean_recall"], b.score["mean_recall"]]}
        c.record("pairwise", rnd, members, score, kept, **pair)
        if not kept:
            log.info("pairwise: the round-%d merge scores at or below both its members: stop", rnd)
            break
        merged = Soup("pairwise", key, members, score, state if state is not None else c.mix(terms))
        merged.source = str(c.save(c.folder / f"merged_round{rnd}.pt", merged))  # frees the state
        pool[1] = merged
        del state
    else:
        log.warning("pairwise: stopped after --max-rounds %d rounds", max_rounds)
    return max(pool, key=lambda s: s.score["mean_recall"])


def uniform(ings: Sequence[Ingredient], c: Candidates) -> Soup:
    terms = [(i, 1 / len(ings)) for i in ings]
    key, score, state = c.score(terms)
    members = {i.path: 1 / len(ings) for i in ings}
    c.record("uniform", 1, members, score, True)
    return Soup("uniform", key, members, score, state if state is not None else c.mix(terms))


def interpolate(soup: Soup, base: Ingredient, alphas: Sequence[float], c: Candidates) -> Soup:
    method = f"{soup.method}+interpolate"
    best, best_alpha, spare = soup, 1.0, None
    c.record(method, 0, soup.members, soup.score, True, alpha=1.0)
    for rnd, alpha in enumerate(alphas, 1):
        terms = [(soup, alpha), (base, 1 - alpha)]
        key, score, state = c.score(terms, spare)
        spare = spare if state is None else state
        members = flatten([(soup.members, alpha), ({base.path: 1.0}, 1 - alpha)])
        kept = score["mean_recall"] > best.score["mean_recall"]
        c.record(method, rnd, members, score, kept, alpha=alpha)
        if kept:
            state = state if state is not None else c.mix(terms, spare)
            old = best.source if best is not soup else None
            best = Soup(soup.method, key, members, score, state, {"alpha": alpha, "interpolate_with": base.path})
            best_alpha, spare = alpha, old
    log.info("%s: alpha %.3g chosen", method, best_alpha)
    return best
