"""Soup weights and methods: candidates streamed one checkpoint at a time into fp32 buffers (at most a few at a
time), each built only when its score is not cached or it is kept. A term of a sum has a ``key`` (its identity)
and a ``source``: a checkpoint path, a state, or a builder of one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from solution.common import write_jsonl
from solution.model import ModelConfig, clean_state_dict, read_checkpoint, save_checkpoint
from solution.model.precision import dtype_name
from solution.retrieval.metrics import RECALL_KEYS

from . import LOG
from .ingredients import Ingredient

log = logging.getLogger(__name__)

METHODS = ("greedy", "pairwise", "uniform", "model_stock")

State = dict  # name -> fp32 tensor
Source = str | State | Callable[[], State]


def weights_of(source: Source) -> dict:
    if callable(source):
        return source()
    return source if isinstance(source, dict) else clean_state_dict(read_checkpoint(source, mmap=True)["state_dict"])


@torch.no_grad()
def stock(sources: Sequence[Source], start: Source, template: dict) -> tuple[State, dict]:
    """Model Stock (Jang et al., ECCV 2024), per tensor: ``t * mean(w_i) + (1 - t) * w_0`` with ``t = N c / (1 +
    (N - 1) c)``, ``c`` the mean pairwise cosine of the deltas ``w_i - w_0`` (a zero delta counts as cosine 0, a
    negative mean as 0). Returns the weights and each tensor's ``t``."""
    n, w0 = len(sources), weights_of(start)
    avg, units = ({k: torch.zeros(shape) for k, shape in template.items()} for _ in range(2))  # fp32 buffers
    nonzero = dict.fromkeys(template, 0)
    for source in sources:
        sd = weights_of(source)
        for k, a in avg.items():
            a.add_(sd[k].to(torch.float32), alpha=1 / n)
            delta = sd[k].to(torch.float32) - w0[k].to(torch.float32)
            norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
            if norm > 0:
                units[k].add_(delta, alpha=1 / norm)  # sum of unit deltas: |sum|^2 = nonzero + 2 * sum of cosines
                nonzero[k] += 1
        del sd
    ratios = {}
    for k, a in avg.items():
        squared = float(torch.linalg.vector_norm(units.pop(k), dtype=torch.float64)) ** 2
        cos = max(0.0, (squared - nonzero[k]) / (n * (n - 1)))
        ratios[k] = t = n * cos / (1 + (n - 1) * cos)
        a.mul_(t).add_(w0[k].to(torch.float32), alpha=1 - t)
    return avg, ratios


def flatten(parts: Sequence[tuple[dict, float]]) -> dict:
    """Weights over the original checkpoints ``{path: weight}`` of a weighted sum of soups' members."""
    out: dict = {}
    for members, w in parts:
        for p, v in members.items():
            out[p] = out.get(p, 0.0) + w * v
    return out


@dataclasses.dataclass
class Soup:
    method: str
    key: str
    members: dict  # path -> weight, over the original checkpoints
    score: dict | None
    source: Source  # the weights: a path, an fp32 state (not yet rounded) or its builder
    extra: dict = dataclasses.field(default_factory=dict)


def name(path) -> str:
    return Path(str(path)).name


def scores(score: dict | None, parts=("report", "all", "hits")) -> dict:
    """A score's recall (of the selection part) and its ``parts`` present (``report``, ``all``: other part, all)."""
    return {**{k: score.get(k) for k in RECALL_KEYS}, **{p: score[p] for p in parts if score.get(p)}} if score else {}


def log_row(method: str, rnd: int, members: dict, score: dict | None, kept: bool, label: str, **extra) -> dict:
    """One ``soup_log.jsonl`` line; ``label`` says what the candidate is."""
    row = {"method": method, "round": rnd, "label": label, "members": list(members)}
    row.update(weights=[float(w) for w in members.values()], kept=bool(kept))
    row.update(scores(score, ("report", "all", "cached", "hits")), **extra)
    mr = f"{score['mean_recall']:.3f}{' (cached)' * score['cached']}" if score else "-"
    log.info("%s round %d: %s, mean recall %s -> %s", method, rnd, label, mr, "kept" if kept else "dropped")
    return row


class Candidates:
    """What the methods share: the soup's tensors, dtype, scorer (None: nothing scored) and the running log."""

    def __init__(self, config: ModelConfig, template: dict, dtype: torch.dtype, scorer):
        self.config, self.template, self.dtype, self.scorer = config, template, dtype, scorer
        self.folder, self.rows, self.ratios = Path("."), [], {}  # ratios: Model Stock's, by candidate key

    def start(self, folder: Path, rows: Sequence[dict]) -> None:
        self.folder, self.rows = folder, list(rows)

    def record(self, method: str, rnd: int, members: dict, score: dict | None, kept: bool, label: str, **extra):
        self.rows.append(log_row(method, rnd, members, score, kept, label, **extra))
        write_jsonl(self.folder / LOG, self.rows)

    @torch.no_grad()
    def mix(self, terms: Sequence[tuple[object, float]], out: State | None = None) -> State:
        """``sum(w * term.source)`` into ``out`` (a new buffer when None)."""
        out = out if out is not None else {k: torch.zeros(shape) for k, shape in self.template.items()}
        for i, (term, w) in enumerate(terms):
            sd = weights_of(term.source)
            for k, t in out.items():
                if i == 0:
                    torch.mul(sd[k].to(torch.float32), w, out=t)
                else:
                    t.add_(sd[k].to(torch.float32), alpha=w)
            del sd
        return out

    def key(self, terms: Sequence[tuple[object, float]], method: str | None = None) -> str:
        """Identity of a candidate: its terms' keys and weights, in order, the dtype (and a method other than a sum)."""
        recipe = {"terms": [[t.key, round(float(w), 12)] for t, w in terms], "dtype": dtype_name(self.dtype)}
        blob = json.dumps({**recipe, **({"method": method} if method else {})})
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()

    def score(self, terms, buf: State | None = None, method: str | None = None, build=None):
        """Key, score and weights of ``sum(w * term)`` (or of ``build()``): built (into ``buf``) only when the
        score is not cached, else their builder."""
        key = self.key(terms, method)
        build = build or (lambda: self.mix(terms, buf))
        hit = self.scorer.score(key) if self.scorer else None
        if hit is not None:
            return key, hit, build
        state = build()
        return key, self.scorer.score(key, state) if self.scorer else None, state

    def save(self, path: Path, soup: Soup) -> Path:
        """Write ``soup`` in the soup dtype with its recipe."""
        state = {k: t.to(self.dtype) for k, t in weights_of(soup.source).items()}
        recipe = {"method": soup.method, "members": list(soup.members), "weights": list(soup.members.values())}
        if soup.score:
            recipe.update(score={k: soup.score[k] for k in RECALL_KEYS}, report=soup.score["report"])
            recipe["all"] = soup.score["all"]
        recipe.update(soup.extra)
        save_checkpoint(path, state, self.config, name=path.stem, recipe=recipe)
        log.info("wrote %s", path)
        return path


def _built(state: Source) -> Source:
    return state() if callable(state) else state


def _climb(c: Candidates, method: str, best: Soup, steps, fixed: Soup | None = None) -> Soup:
    """Try each step (from the best soup so far: ``(terms, members, label, extra)``); a strictly better candidate
    becomes the best. Buffers are reused, but not ``fixed``'s (a term of every step)."""
    spare = None
    for rnd, step in enumerate(steps, 1):
        terms, members, label, extra = step(best)
        key, score, state = c.score(terms, spare)
        spare = state if isinstance(state, dict) else spare
        kept = score["mean_recall"] > best.score["mean_recall"]
        c.record(method, rnd, members, score, kept, label, **extra)
        if kept:
            old = best.source if best is not fixed and isinstance(best.source, dict) else None
            best, spare = Soup(best.method, key, members, score, _built(state), extra), old
    return best


def greedy(ings: Sequence[Ingredient], c: Candidates) -> Soup:
    order = sorted(ings, key=lambda i: (-i.score["mean_recall"], i.path))
    first = Soup("greedy", c.key([(order[0], 1.0)]), {order[0].path: 1.0}, order[0].score, c.mix([(order[0], 1.0)]))
    c.record("greedy", 0, first.members, first.score, True, name(order[0].path))

    def add(soup: Soup, ing: Ingredient):  # to the running average
        n = len(soup.members)
        members = {**{p: w * n / (n + 1) for p, w in soup.members.items()}, ing.path: 1 / (n + 1)}
        return [(soup, n / (n + 1)), (ing, 1 / (n + 1))], members, f"+ {name(ing.path)}", {}

    return _climb(c, "greedy", first, [lambda soup, ing=ing: add(soup, ing) for ing in order[1:]])


def pairwise(ings: Sequence[Ingredient], c: Candidates, max_rounds: int) -> Soup:
    def _label(s: Soup) -> str:  # a merged soup: its file name in the soup folder
        return Path(s.source).name if Path(s.source).parent == c.folder else s.source

    pool = [Soup("pairwise", c.key([(i, 1.0)]), {i.path: 1.0}, i.score, i.path) for i in ings]
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
        c.record("pairwise", rnd, members, score, kept, f"{name(_label(a))} + {name(_label(b))}", **pair)
        if not kept:
            log.info("pairwise: the round-%d merge scores at or below both its members: stop", rnd)
            break
        merged = Soup("pairwise", key, members, score, _built(state))
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
    c.record("uniform", 1, members, score, True, f"average of {len(ings)}")
    return Soup("uniform", key, members, score, state)


def model_stock(ings: Sequence[Ingredient], c: Candidates, start: Ingredient) -> Soup:
    """Model Stock of the fine-tunes ``ings`` and their ``start``; ``weights``: the ratio's mean over all weights."""
    ratios = {}

    def build() -> State:
        state, got = stock([i.source for i in ings], start.source, c.template)
        ratios.update(got)
        return state

    terms = [*((i, 1 / len(ings)) for i in ings), (start, 0.0)]
    key, score, state = c.score(terms, method="model_stock", build=build)
    if not ratios and key not in c.ratios:  # scored earlier: the ratios once per run
        state = build()
    ratios = c.ratios.setdefault(key, ratios)
    sizes = {k: torch.Size(s).numel() for k, s in c.template.items()}
    t = sum(ratios[k] * n for k, n in sizes.items()) / sum(sizes.values())
    members = {**{i.path: t / len(ings) for i in ings}, start.path: 1 - t}
    extra = {"start": start.path, "ratio": {"min": min(ratios.values()), "mean": t, "max": max(ratios.values())}}
    c.record("model_stock", 1, members, score, True, f"model stock of {len(ings)}, mean ratio {t:.3f}", **extra)
    return Soup("model_stock", key, members, score, state, extra)


def interpolate(soup: Soup, base: Ingredient, alphas: Sequence[float], c: Candidates) -> Soup:
    method, soup.source = f"{soup.method}+interpolate", _built(soup.source)
    c.record(method, 0, soup.members, soup.score, True, "alpha 1", alpha=1.0)

    def mixed(alpha: float):
        extra = {"alpha": alpha, "interpolate_with": base.path}
        members = flatten([(soup.members, alpha), ({base.path: 1.0}, 1 - alpha)])
        return lambda _: ([(soup, alpha), (base, 1 - alpha)], members, f"alpha {alpha:g}", extra)

    return _climb(c, method, soup, map(mixed, alphas), fixed=soup)
