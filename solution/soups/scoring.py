"""Scoring soup candidates on validation data, through retrieval, with a score cache.

A candidate is encoded once (one reused model; the gallery decoded and the queries tokenised once
per run): its per-query hits over every validation query give, by the official arithmetic, the
R@1/5/10 and mean recall of the selection part, of the report part (``"report"``) and of all
queries (``"all"``), as the weights will be saved (rounded to the soup's dtype), for the run's draw
of the queries or another (:meth:`Scorer.view`, the ``--folds`` folds). The run's draw caches each
score under the candidate's key, the validation data's identity, the effective precision and the
device type, its hits in ``hits/`` named in the score (``"hits"``, relative to the soup folder);
another draw's scores come from those hits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from solution.common import SolutionError, resolve_device, write_json
from solution.formats.hits import read_hits, write_hits
from solution.model import ModelConfig, meta_model
from solution.model.precision import effective_precision
from solution.retrieval.encode import ValData, prepare_inputs, score_parts
from solution.retrieval.metrics import recall_from_hits

from .weights import Source, weights_of

log = logging.getLogger(__name__)

CACHE_VERSION = "v3"


class ScoreCache:
    """``score_cache.json``: ``{"fingerprints": {file identity: digest}, "scores": {key: score}}``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            self.fingerprints, self.scores = dict(data.get("fingerprints", {})), dict(data.get("scores", {}))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError):
            log.warning("ignoring unreadable score cache %s", path)
            self.fingerprints, self.scores = {}, {}

    def save(self) -> None:
        write_json(self.path, {"fingerprints": self.fingerprints, "scores": self.scores}, indent=None)


def _recall(text_ids: Sequence[int], hits, ids: Sequence[int], what: str) -> dict:
    """Recall of the queries ``ids`` (those without a gold image in the gallery were not scored)."""
    row = {t: i for i, t in enumerate(text_ids)}
    rows = [row[t] for t in ids if t in row]
    if not rows:
        raise SolutionError(f"no query of the {what} part has a decodable gold image")
    return recall_from_hits(hits[rows])


class Scorer:
    """Scores of candidates on ``val`` (``opts``: a :class:`~.make_soups.SoupOptions`), rounded to ``round_to``."""

    def __init__(
        self, val: ValData, config: ModelConfig, cache: ScoreCache, opts, round_to: torch.dtype, hits_dir=None
    ):
        self.val, self.config, self.cache, self.round_to = val, config, cache, round_to
        self.hits_dir, self.device = hits_dir and Path(hits_dir), torch.device(resolve_device(opts.device))
        self.kw = dict(batch_size=opts.batch_size, num_workers=opts.num_workers, progress=sys.stderr.isatty())
        self.precision = opts.precision
        self.prefix = (
            f"{CACHE_VERSION}|{val.key}|{effective_precision(self.device, opts.precision)}|{self.device.type}|"
        )
        self.select, self.report = list(val.select), list(val.report)
        self.main, self.memo = self, {}  # memo: key -> (text ids, [Q, 3] hits) over every query
        self.model, self.owned, self.inputs = None, False, None  # owned: the model has storage of its own

    def view(self, select: Sequence[int], report: Sequence[int]) -> Scorer:
        """A scorer of the same candidates on another draw of the queries, from their hits (no encoding)."""
        v = copy.copy(self)
        v.select, v.report = list(select), list(report)
        return v

    def _recalls(self, tids: list, hits) -> dict:
        result = {**_recall(tids, hits, self.select, "selection"), "report": None, "all": None}
        if self.report:
            result["report"] = _recall(tids, hits, self.report, "report")
            result["all"] = _recall(tids, hits, self.select + self.report, "all")
        return result

    def cached(self, key: str) -> dict | None:
        if self.main is not self:
            got = self.main.query_hits(key)
            return None if got is None else {**self._recalls(*got), "cached": True}
        hit = self.cache.scores.get(self.prefix + key)
        if hit is None:
            return None
        hit = dict(hit, cached=True)
        if hit.get("hits") and (self.hits_dir is None or not (self.hits_dir.parent / hit["hits"]).is_file()):
            del hit["hits"]
        return hit

    def score(self, key: str, source: Source) -> dict:
        """Scores of ``source`` (rounded to the soup's dtype first, as it will be saved), cached by ``key``."""
        hit = self.cached(key)
        if hit is not None:
            return hit
        if self.main is not self:
            return self._recalls(*self.main.query_hits(key, source))
        self.memo[key] = tids, hits = self._encode(source)
        result = self._recalls(tids, hits)
        if self.hits_dir is not None:
            name = hashlib.blake2b((self.prefix + key).encode(), digest_size=12).hexdigest()
            result["hits"] = str(write_hits(self.hits_dir / name, tids, hits).relative_to(self.hits_dir.parent))
        self.cache.scores[self.prefix + key] = result
        self.cache.save()
        return dict(result)

    def query_hits(self, key: str, source: Source | None = None) -> tuple[list, object] | None:
        """``(text ids, [Q, 3] hits)`` of a candidate over every query: kept, read back from its hits file,
        or (given ``source``) encoded again; None when none of these is possible."""
        if key not in self.memo:
            hit = self.cached(key)
            if hit is not None and hit.get("hits"):
                tids, hits = read_hits(self.hits_dir.parent / hit["hits"])
                self.memo[key] = (tids.tolist(), hits)
            elif source is not None:
                self.cache.scores.pop(self.prefix + key, None)  # scored without a hits file we can read: again
                self.score(key, source)
        return self.memo.get(key)

    @torch.no_grad()
    def _encode(self, source: Source) -> tuple[list, object]:
        if self.model is None:  # on the meta device: no memory and no init until weights are loaded
            self.model, self.owned = meta_model(self.config).eval().requires_grad_(False), False
        if isinstance(source, dict) and self.device.type == "cpu" and self.round_to == torch.float32:
            self.model.load_state_dict(source, assign=True)  # no copy: the model reads our fp32 buffer
            self.owned = False
        else:
            if not self.owned:
                self.model.to_empty(device=self.device)
                self.owned = True
            sd = weights_of(source)
            for k, p in self.model.state_dict().items():
                p.copy_(sd[k].to(self.round_to))
            del sd
        val, kw = self.val, self.kw
        if self.inputs is None:
            self.inputs = prepare_inputs(val.split, self.config, val.queries, **kw)
        parts, kw = {"all": self.select + self.report}, {**kw, "device": self.device, "precision": self.precision}
        got = score_parts(
            self.model, val.split, self.config, val.queries, parts, with_hits=True, inputs=self.inputs, **kw
        )
        return list(got["all"]["text_ids"]), got["all"]["hits"]

    def release(self) -> None:
        """Drop the model (and with it any reference to our buffers)."""
        self.main.model, self.main.owned = None, False
