"""Scoring soup candidates through retrieval: each candidate is encoded once, as it will be saved (rounded to the
soup's dtype), into per-query hits over every validation query, kept in ``hits/`` under a name digesting its key
and all else that decides them (the score cache); any part's recall comes from the hits."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from solution.common import SolutionError, resolve_device
from solution.formats.hits import SUFFIX, read_hits, write_hits
from solution.model import ModelConfig, meta_model
from solution.model.precision import effective_precision
from solution.retrieval.encode import ValData, prepare_inputs, score_parts
from solution.retrieval.metrics import recall_from_hits

from . import HITS
from .methods import Source, weights_of

log = logging.getLogger(__name__)

CACHE_VERSION = "v4"


def _recall(tids: Sequence[int], hits: np.ndarray, ids: Sequence[int], what: str) -> dict:
    """Recall of the queries ``ids`` (those without a gold image in the gallery were not scored)."""
    row = {t: i for i, t in enumerate(tids)}
    rows = [row[t] for t in ids if t in row]
    if not rows:
        raise SolutionError(f"no query of the {what} part has a decodable gold image")
    return recall_from_hits(hits[rows])


class Scorer:
    """Scores of candidates on ``val`` (``opts``: the soup's flags), their hits named relative to ``folder``."""

    def __init__(self, val: ValData, config: ModelConfig, folder: Path, opts, round_to: torch.dtype):
        self.val, self.config, self.folder, self.round_to = val, config, folder, round_to
        self.device, self.precision = resolve_device(opts.device), opts.precision
        self.kw = dict(batch_size=opts.batch_size, num_workers=opts.num_workers, progress=sys.stderr.isatty())
        decides = [CACHE_VERSION, val.key, sorted(config.model_info.items()), config.context_length, config.text_prompt]
        self.prefix = json.dumps([*decides, effective_precision(self.device, opts.precision), self.device.type])
        self.select, self.report = list(val.select), list(val.report)
        self.memo, self.tids, self.encoded = {}, None, 0  # key -> [Q, 3] hits over tids (queries with a gold image)
        self.model = self.inputs = None

    def path(self, key: str) -> Path:
        return self.folder / HITS / (hashlib.blake2b((self.prefix + key).encode(), digest_size=12).hexdigest() + SUFFIX)

    def hits(self, key: str, source: Source | None = None) -> np.ndarray | None:
        """A candidate's hits: kept, read back, or (given ``source``) encoded; None when none of these can be."""
        path = self.path(key)
        if key not in self.memo and path.is_file():
            try:
                tids, self.memo[key] = read_hits(path)
                self.tids = tids.tolist()
            except SolutionError as e:
                log.warning("%s: scoring it again", e)
                path.unlink()  # this folder's link only: the earlier soup folder keeps its file
        if key not in self.memo and source is not None:
            tids, self.memo[key] = self._encode(source)
            self.tids, self.encoded = self.tids or tids, self.encoded + 1
            write_hits(path, tids, self.memo[key])
        return self.memo.get(key)

    def score(self, key: str, source: Source | None = None) -> dict | None:
        """Recall of the selection (``report``, ``all``: of the other part and all queries) and the hits file."""
        encoded = self.encoded
        hits = self.hits(key, source)
        if hits is None:
            return None
        result = {**_recall(self.tids, hits, self.select, "selection"), "report": None, "all": None}
        if self.report:
            result["report"] = _recall(self.tids, hits, self.report, "report")
            result["all"] = _recall(self.tids, hits, self.select + self.report, "all")
        return {**result, "hits": str(self.path(key).relative_to(self.folder)), "cached": self.encoded == encoded}

    @torch.no_grad()
    def _encode(self, source: Source) -> tuple[list, np.ndarray]:
        if self.model is None:  # built on the meta device: no init, memory only for the weights copied in
            self.model = meta_model(self.config).to_empty(device=self.device).eval().requires_grad_(False)
        sd = weights_of(source)
        for k, p in self.model.state_dict().items():
            p.copy_(sd[k].to(self.round_to))
        del sd
        val = self.val
        if self.inputs is None:
            self.inputs = prepare_inputs(val.split, self.config, val.queries, **self.kw)
        kw = {**self.kw, "device": self.device, "precision": self.precision, "inputs": self.inputs, "with_hits": True}
        got = score_parts(self.model, val.split, self.config, val.queries, {"all": val.select + val.report}, **kw)
        return list(got["all"]["text_ids"]), got["all"]["hits"]
