"""Soup methods as plain functions over scored ingredients: greedy, pairwise, uniform, and interpolation.

- :func:`greedy` (model soups, Wortsman et al. 2022): sort the ingredients by held-out score, best
  first; add each next one as a running average (``n/(n+1)``, ``1/(n+1)``) and keep it only if
  mean recall strictly improves.
- :func:`pairwise` (the Tianchi recipe): each round average the two best models of the pool; a
  merge that beats the worse of its two members replaces it (saved as ``merged_round{N}.pt``); a
  merge that does not (it scores at or below both) ends the search.
- :func:`uniform`: the plain average of all.
- :func:`interpolate`: ``alpha * soup + (1 - alpha) * base`` for each alpha, chosen by held-out
  score; ``alpha = 1`` (the soup itself) wins ties.

A :class:`Pot` is what they share: the soup's tensors and dtype, the scorer (cached scores are
not recomputed and their weights are only built when kept), the method's ``soup_log.jsonl`` and
the checkpoint writer. At most a few fp32 states are held at a time (soup, candidate, best
interpolation).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from solution.common import write_jsonl
from solution.model import ModelConfig, save_checkpoint
from solution.model.precision import dtype_name
from solution.retrieval.metrics import RECALL_KEYS

from .ingredients import Ingredient
from .scoring import Scorer
from .weights import Source, State, cast_state, flatten, mix, new_state, recipe_key, weights_of

log = logging.getLogger(__name__)

METHODS = ("greedy", "pairwise", "uniform")
LOG_NAME = "soup_log.jsonl"


@dataclasses.dataclass
class Soup:
    method: str
    key: str
    members: dict  # path -> weight (over original checkpoints)
    score: dict | None
    source: Source  # the weights: a path or an fp32 state (not yet rounded)
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Ref:
    """An ingredient as a term of a weighted sum."""

    key: str
    source: Source


def fmt_recall(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def log_row(method: str, rnd: int, members: dict, score: dict | None, kept: bool, **extra) -> dict:
    """One ``soup_log.jsonl`` line (scores are the selection part's; ``report`` the other part's)."""
    score = score or {}
    row = {
        "method": method,
        "round": rnd,
        "members": list(members),
        "weights": [float(w) for w in members.values()],
        **{k: score.get(k) for k in RECALL_KEYS},
        "kept": bool(kept),
    }
    for part in ("report", "all"):
        if score.get(part):
            row[part] = score[part]
    if score.get("cached"):
        row["cached"] = True
    if score.get("hits"):  # per-query hits file, relative to the soup folder
        row["hits"] = score["hits"]
    row.update(extra)
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


def save_soup(path: Path, soup: Soup, config: ModelConfig, dtype: torch.dtype) -> Path:
    """Write ``soup`` in ``dtype`` with its recipe; an in-memory state is converted in place (it is done with)."""
    state = cast_state(soup.source if isinstance(soup.source, dict) else dict(weights_of(soup.source)), dtype)
    recipe = {
        "method": soup.method,
        "members": list(soup.members),
        "weights": list(soup.members.values()),
        **soup.extra,
    }
    if soup.score:
        recipe["score"] = {k: soup.score.get(k) for k in RECALL_KEYS}
        recipe["report"] = soup.score.get("report")
        recipe["all"] = soup.score.get("all")
    tuning = dict(config.tuning or {})
    if tuning.get("mode") == "lora":
        tuning["merged"] = True
    save_checkpoint(path, state, dataclasses.replace(config, tuning=tuning), name=path.stem, recipe=recipe)
    del state
    log.info("wrote %s", path)
    return path


class Pot:
    """What the methods share: tensors, dtype, scorer (None: nothing scored), log and checkpoint writer."""

    def __init__(self, config: ModelConfig, template: dict, dtype: torch.dtype, scorer: Scorer | None):
        self.config, self.template, self.dtype, self.scorer = config, template, dtype, scorer
        self.out_dir: Path = Path(".")
        self.rows: list[dict] = []

    def start(self, out_dir: Path, rows: Sequence[dict]) -> None:
        """Write this method's log (starting with ``rows``) and its files in ``out_dir``."""
        self.out_dir, self.rows = out_dir, list(rows)
        out_dir.mkdir(parents=True, exist_ok=True)

    def record(self, method: str, rnd: int, members: dict, score: dict | None, kept: bool, **extra) -> None:
        self.rows.append(log_row(method, rnd, members, score, kept, **extra))
        write_jsonl(self.out_dir / LOG_NAME, self.rows)

    def taste(self, terms: Sequence[tuple[Any, float]], buf: State | None) -> tuple[str, dict, State | None]:
        """Key and score of ``sum(w * x.source)``; the weights are computed (into ``buf``) only if not cached."""
        key = recipe_key([(t.key, w) for t, w in terms], dtype_name(self.dtype))
        score = self.scorer.cached(key) if self.scorer else None
        if score is not None:
            return key, score, None
        state = self.mix(terms, buf)
        return key, (self.scorer.score(key, state) if self.scorer else None), state

    def mix(self, terms, buf: State | None) -> State:
        return mix([(t.source, w) for t, w in terms], buf if buf is not None else new_state(self.template))

    def save(self, path: Path, soup: Soup) -> Path:
        return save_soup(path, soup, self.config, self.dtype)


def greedy(ings: Sequence[Ingredient], pot: Pot) -> Soup:
    """Model soups: best first; add each next as a running average if mean recall strictly improves."""
    order = sorted(ings, key=lambda i: (-i.score["mean_recall"], i.path))
    first = order[0]
    soup = Soup("greedy", first.key, {first.path: 1.0}, first.score, pot.mix([(Ref(first.key, first.path), 1.0)], None))
    pot.record("greedy", 0, soup.members, soup.score, True)
    spare = None  # the second buffer: candidates are built here; a kept one swaps with the soup's
    for rnd, ing in enumerate(order[1:], 1):
        n = len(soup.members)
        terms = [(soup, n / (n + 1)), (Ref(ing.key, ing.path), 1 / (n + 1))]
        key, score, state = pot.taste(terms, spare)
        spare = state if state is not None else spare
        members = {**{p: w * n / (n + 1) for p, w in soup.members.items()}, ing.path: 1 / (n + 1)}
        kept = score["mean_recall"] > soup.score["mean_recall"]
        pot.record("greedy", rnd, members, score, kept)
        if kept:
            if state is None:  # scored from the cache: build the weights now
                spare = pot.mix(terms, spare)
            soup.source, spare = spare, soup.source
            soup.key, soup.members, soup.score = key, members, score
    return soup


def _label(s: Soup) -> str:
    return s.source if isinstance(s.source, str) else f"<{s.method}>"


def pairwise(ings: Sequence[Ingredient], pot: Pot, max_rounds: int) -> Soup:
    """Tianchi: merge the two best; a merge beating the worse member replaces it; else stop."""
    pool = [Soup("pairwise", i.key, {i.path: 1.0}, i.score, i.path) for i in ings]
    for rnd in range(1, max_rounds + 1):
        if len(pool) < 2:
            break
        pool.sort(key=lambda s: (-s.score["mean_recall"], _label(s)))
        a, b = pool[0], pool[1]
        key, score, state = pot.taste([(a, 0.5), (b, 0.5)], None)
        members = flatten([(a.members, 0.5), (b.members, 0.5)])
        kept = score["mean_recall"] > b.score["mean_recall"]
        pot.record(
            "pairwise",
            rnd,
            members,
            score,
            kept,
            pair=[_label(a), _label(b)],
            pair_scores=[a.score["mean_recall"], b.score["mean_recall"]],
        )
        if not kept:
            log.info("pairwise: the round-%d merge scores at or below both its members: stop", rnd)
            break
        merged = Soup(
            "pairwise", key, members, score, state if state is not None else pot.mix([(a, 0.5), (b, 0.5)], None)
        )
        merged.source = str(pot.save(pot.out_dir / f"merged_round{rnd}.pt", merged))  # frees the state
        pool[1] = merged
        del state
    else:
        log.warning("pairwise: stopped after --max-rounds %d rounds", max_rounds)
    return max(pool, key=lambda s: s.score["mean_recall"])


def uniform(ings: Sequence[Ingredient], pot: Pot) -> Soup:
    """The plain average of every ingredient."""
    n = len(ings)
    terms = [(Ref(i.key, i.path), 1 / n) for i in ings]
    key, score, state = pot.taste(terms, None)
    members = {i.path: 1 / n for i in ings}
    pot.record("uniform", 1, members, score, True)
    return Soup("uniform", key, members, score, state if state is not None else pot.mix(terms, None))


def interpolate(soup: Soup, base: Ingredient, alphas: Sequence[float], pot: Pot) -> Soup:
    """``alpha * soup + (1 - alpha) * base`` for each alpha; the soup itself (alpha 1) wins ties."""
    method = f"{soup.method}+interpolate"
    best, best_alpha, scratch = soup, 1.0, None
    pot.record(method, 0, soup.members, soup.score, True, alpha=1.0)
    for rnd, alpha in enumerate(alphas, 1):
        terms = [(soup, alpha), (Ref(base.key, base.path), 1 - alpha)]
        key, score, state = pot.taste(terms, scratch)
        scratch = state if state is not None else scratch
        members = flatten([(soup.members, alpha), ({base.path: 1.0}, 1 - alpha)])
        kept = score["mean_recall"] > best.score["mean_recall"]
        pot.record(method, rnd, members, score, kept, alpha=alpha)
        if kept:
            if state is None:
                scratch = pot.mix(terms, scratch)
            old = best.source if best is not soup else None
            best = Soup(soup.method, key, members, score, scratch, {"alpha": alpha, "interpolate_with": base.path})
            best_alpha, scratch = alpha, old
    log.info("%s: alpha %.3g chosen", method, best_alpha)
    return best
