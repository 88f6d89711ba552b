"""Validation queries for scoring many models on one split: the queries (``--val-texts`` or the LMDB's pairs),
their gold, and the selection/report draw of ``--select-split``."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

from solution.common import SolutionError
from solution.data.lmdb_io import LMDBSplit
from solution.formats.muge import read_texts

from .encode import split_queries, text_queries

log = logging.getLogger(__name__)


def draw_selection(text_ids, fraction: float | None, seed: int) -> tuple[list[int], list[int]]:
    """``(select, report)``: a random ``fraction`` of the queries and the rest (all and none without one)."""
    tids = list(text_ids)
    if not fraction:
        return tids, []
    if not 0 < fraction < 1 or len(tids) < 2:
        raise SolutionError(f"--select-split must be a fraction in (0, 1) of at least 2 queries, got {fraction}")
    perm = tids[:]
    random.Random(seed).shuffle(perm)
    chosen = set(perm[: min(max(1, round(fraction * len(tids))), len(tids) - 1)])
    return [t for t in tids if t in chosen], [t for t in tids if t not in chosen]


class ValData:
    """Validation queries (from ``--val-texts`` or the LMDB pairs) and the selection/report split."""

    def __init__(self, split_dir: str, texts_path: str | None, select_split: float | None, seed: int):
        split_dir = Path(split_dir)
        if not split_dir.exists():
            raise SolutionError(f"validation data not found: {split_dir}")
        if texts_path:
            self.split = LMDBSplit(split_dir, need_pairs=False)
            self.queries = text_queries(read_texts(texts_path, need_gold=True, what="validation texts"))
        elif not (split_dir / "pairs" / "data.mdb").is_file():
            raise SolutionError(f"validation data {split_dir} has no texts (no pairs LMDB): pass --val-texts")
        else:
            self.split = LMDBSplit(split_dir)
            self.queries = split_queries(self.split)
        q, gallery = self.queries, set(self.split.image_ids())
        missing = sum(i not in gallery for gold in q.gold.values() for i in gold)
        if missing:
            log.warning(
                f"validation: {missing} gold image ids are not in {split_dir} (a query without any: not scored)"
            )
        self.select, self.report = draw_selection(q.text_ids, select_split, seed)
        h = hashlib.blake2b(self.split.images_digest().encode(), digest_size=16)
        queries = [(q.texts[i], q.gold[t]) for i, t in enumerate(q.text_ids)]
        h.update(json.dumps([self.select, self.report, queries], ensure_ascii=False).encode())
        self.key = h.hexdigest()
        log.info(f"validation: {len(q.text_ids)} queries ({len(self.select)} select), {self.split.num_images} images")

    def parts(self) -> dict[str, list[int]]:
        """The query parts scored: the selection, and with a draw also the report part and all queries."""
        if not self.report:
            return {"select": self.select}
        return {"select": self.select, "report": self.report, "all": self.select + self.report}
