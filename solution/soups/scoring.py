"""Scoring soup candidates on validation data, through retrieval, with a score cache.

:class:`ValData` holds the validation queries (``--val-texts`` read by
:func:`solution.formats.muge.read_texts` with their gold, or the LMDB's pairs) and the
selection/report draw of ``--select-split``. :class:`Scorer` loads weights into one reused model
and scores them with :func:`solution.retrieval.encode.score_parts` (the path validation takes;
the gallery decoded and the queries tokenised once for every candidate of the run,
:func:`~solution.retrieval.encode.prepare_inputs`, the decoded pixels up to ``image_cache_bytes``):
text->image R@1/5/10 and mean recall of the selection part, the report part (``"report"``) and
all queries (``"all"``), as the weights are saved (rounded to the soup's dtype). Scores are cached
in ``OUT/score_cache.json`` (:class:`ScoreCache`) under the candidate's key, the validation data's
identity (the image LMDB's content digest, the queries and the draw), the effective precision
and the device type. With a ``hits_dir`` (the soup folder's ``hits/``) each scored candidate's
per-query hits over all the validation queries are written there (:mod:`solution.formats.hits`,
named by a digest of the cache key) and its score names the file in ``"hits"``, relative to the
soup folder; a cached score whose file is gone has no ``"hits"``. :meth:`Scorer.view` scores on
another draw of the queries (the ``--folds`` cross-fitting's) from each candidate's per-query hits
over all queries, so the model encodes a candidate once whatever the draw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from solution.common import SolutionError, write_json
from solution.formats.hits import read_hits, write_hits
from solution.model import ModelConfig, meta_model
from solution.model.precision import effective_precision
from solution.retrieval.encode import prepare_inputs, score_parts
from solution.retrieval.metrics import RECALL_KEYS, recall_from_hits
from solution.retrieval.pixels import IMAGE_CACHE_BYTES
from solution.retrieval.val_data import ValData

from .weights import Source, weights_of

log = logging.getLogger(__name__)

CACHE_VERSION = "v3"  # v2 keyed the LMDB by path, size and modification time


class ScoreCache:
    """``score_cache.json``: ``{"fingerprints": {file identity: digest}, "scores": {key: score}}``."""

    def __init__(self, path: Path):
        self.path = path
        self.fingerprints: dict = {}
        self.scores: dict = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.fingerprints.update(data.get("fingerprints", {}))
                self.scores.update(data.get("scores", {}))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                log.warning("ignoring unreadable score cache %s", path)

    def save(self) -> None:
        write_json(self.path, {"fingerprints": self.fingerprints, "scores": self.scores}, indent=None)


def _recall(part: dict) -> dict:
    return {k: part[k] for k in RECALL_KEYS}


class Scorer:
    """Scores weights on the validation data with one reused model; results cached in a :class:`ScoreCache`."""

    def __init__(
        self,
        val: ValData,
        config: ModelConfig,
        cache: ScoreCache,
        *,
        device,
        batch_size: int,
        num_workers: int,
        precision: str,
        round_to: torch.dtype,
        hits_dir: Path | None = None,
        image_cache_bytes: int = IMAGE_CACHE_BYTES,
    ):
        self.val, self.config, self.cache = val, config, cache
        self.hits_dir = None if hits_dir is None else Path(hits_dir)
        self.device, self.round_to = torch.device(device), round_to
        self.encode_kw = dict(
            device=self.device,
            batch_size=batch_size,
            num_workers=num_workers,
            precision=precision,
            progress=sys.stderr.isatty(),
        )
        self.prefix = f"{CACHE_VERSION}|{val.key}|{effective_precision(device, precision)}|{self.device.type}|"
        self._model = None
        self._owned = False  # the model has storage of its own (else it reads one of our buffers, or is on meta)
        self._hits: dict[str, tuple[list, object]] = {}  # key -> (text ids, [Q, 3] hits) over every query
        self.image_cache_bytes = image_cache_bytes
        self._inputs = None  # the decoded gallery and tokenised queries, made at the first candidate scored

    def cached(self, key: str) -> dict | None:
        hit = self.cache.scores.get(self.prefix + key)
        if hit is None:
            return None
        hit = dict(hit, cached=True)
        if hit.get("hits") and (self.hits_dir is None or not (self.hits_dir.parent / hit["hits"]).is_file()):
            del hit["hits"]
        return hit

    def _write_hits(self, key: str, part: dict) -> str | None:
        """Store one candidate's per-query hits; their path relative to the soup folder."""
        if self.hits_dir is None:
            return None
        name = hashlib.blake2b((self.prefix + key).encode(), digest_size=12).hexdigest()
        write_hits(self.hits_dir / name, part["text_ids"], part["hits"])
        return f"{self.hits_dir.name}/{name}.hits.npy"

    @property
    def model(self):
        """cn_clip's CLIP built on the meta device: no memory and no init until weights are loaded."""
        if self._model is None:
            self._model = meta_model(self.config).eval().requires_grad_(False)
            self._owned = False
        return self._model

    def release(self) -> None:
        """Drop the model (and with it any reference to our buffers)."""
        self._model, self._owned = None, False

    @torch.no_grad()
    def _load(self, source: Source) -> None:
        model = self.model
        if isinstance(source, dict) and self.device.type == "cpu" and self.round_to == torch.float32:
            model.load_state_dict(source, assign=True)  # no copy: the model reads our fp32 buffer
            self._owned = False
            return
        if not self._owned:
            model.to_empty(device=self.device)
            self._owned = True
        sd = weights_of(source)
        for k, p in model.state_dict().items():
            x = sd[k]
            if self.round_to != torch.float32:
                x = x.to(self.round_to)
            p.copy_(x)
        del sd

    def score(self, key: str, source: Source) -> dict:
        """Scores of ``source`` (rounded to the soup's dtype first, as it will be saved), cached by ``key``."""
        hit = self.cached(key)
        if hit is not None:
            return hit
        self._load(source)
        if self._inputs is None:
            kw = self.encode_kw
            self._inputs = prepare_inputs(
                self.val.split,
                self.config,
                self.val.queries,
                batch_size=kw["batch_size"],
                num_workers=kw["num_workers"],
                max_bytes=self.image_cache_bytes,
                progress=kw["progress"],
            )
        parts = score_parts(
            self.model,
            self.val.split,
            self.config,
            self.val.queries,
            self.val.parts(),
            with_hits=True,
            inputs=self._inputs,
            **self.encode_kw,
        )
        result = _recall(parts["select"])
        result["report"] = _recall(parts["report"]) if "report" in parts else None
        result["all"] = _recall(parts["all"]) if "all" in parts else None  # all queries, comparable with runs
        every = parts["all"] if "all" in parts else parts["select"]
        self._hits[key] = (list(every["text_ids"]), every["hits"])
        hits = self._write_hits(key, every)
        if hits:
            result["hits"] = hits
        self.cache.scores[self.prefix + key] = result
        self.cache.save()
        return dict(result)

    def query_hits(self, key: str, source: Source | None = None) -> tuple[list, object] | None:
        """``(text ids, [Q, 3] hits)`` of a candidate over every query: kept, read back from its hits file,
        or (given ``source``) scored again; None when none of these is possible."""
        if key in self._hits:
            return self._hits[key]
        hit = self.cached(key)
        if hit is not None and hit.get("hits"):
            tids, hits = read_hits(self.hits_dir.parent / hit["hits"])
            self._hits[key] = (tids.tolist(), hits)
            return self._hits[key]
        if source is None:
            return None
        self.cache.scores.pop(self.prefix + key, None)  # scored without a hits file we can read: again
        self.score(key, source)
        return self._hits[key]

    def view(self, select: Sequence[int], report: Sequence[int]) -> DrawScorer:
        """A scorer of the same candidates on another selection/report draw of the queries."""
        return DrawScorer(self, select, report)


def hits_recall(text_ids: Sequence[int], hits, ids: Sequence[int], what: str) -> dict:
    """R@1/5/10 and mean recall of the queries ``ids`` from per-query hits, :func:`recall_at_k`'s arithmetic
    digit for digit (queries without a gold image in the gallery are not scored)."""
    row = {t: i for i, t in enumerate(text_ids)}
    rows = [row[t] for t in ids if t in row]
    if not rows:
        raise SolutionError(f"no query of the {what} part has a decodable gold image")
    return recall_from_hits(hits[rows])


class DrawScorer:
    """:class:`Scorer`'s interface on a ``select``/``report`` draw of the queries; scores derived from each
    candidate's per-query hits over every query (one encoding per candidate whatever the draw), cached
    under the draw."""

    def __init__(self, base: Scorer, select: Sequence[int], report: Sequence[int]):
        self.base, self.select, self.report = base, list(select), list(report)
        digest = hashlib.blake2b(json.dumps([self.select, self.report]).encode(), digest_size=12).hexdigest()
        self.prefix = f"{base.prefix}draw:{digest}|"

    def _derive(self, key: str, tids: list, hits) -> dict:
        result = _recall(hits_recall(tids, hits, self.select, "selection"))
        result["report"] = _recall(hits_recall(tids, hits, self.report, "report")) if self.report else None
        result["all"] = _recall(hits_recall(tids, hits, self.select + self.report, "all")) if self.report else None
        self.base.cache.scores[self.prefix + key] = result
        self.base.cache.save()
        return dict(result)

    def cached(self, key: str) -> dict | None:
        hit = self.base.cache.scores.get(self.prefix + key)
        if hit is None:
            got = self.base.query_hits(key)
            hit = None if got is None else self._derive(key, *got)
        return None if hit is None else dict(hit, cached=True)

    def score(self, key: str, source: Source) -> dict:
        hit = self.cached(key)
        return hit if hit is not None else self._derive(key, *self.base.query_hits(key, source))

    def release(self) -> None:
        self.base.release()
