"""MUGE texts (``{split}_texts.jsonl``: ``{"text_id": int, "text": str}`` a line, with the gold ``"image_ids"`` in
train/valid): the one strict reader (the evaluator reads gold files by the official rules, ``prepare`` leniently)."""

import os
from dataclasses import dataclass, field

from solution.common import SolutionError, read_jsonl


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class MugeText:
    text_id: int
    text: str
    image_ids: tuple[int, ...] = field(default=())


def read_texts(path: str | os.PathLike, *, need_gold: bool = False, what: str = "texts") -> list[MugeText]:
    """Every record of a texts JSONL, in file order; refuses bad records with file and record number (``need_gold``:
    also a record without a non-empty ``image_ids`` list)."""
    out, seen = [], set()
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict) or "text_id" not in row or "text" not in row:
            raise SolutionError(f"{path}: record {n} lacks text_id or text")
        tid = row["text_id"]
        if not is_int(tid):
            raise SolutionError(f"{path}: record {n}: text_id {tid!r} is not an integer")
        if tid in seen:
            raise SolutionError(f"{path}: text_id {tid} occurs more than once (record {n})")
        seen.add(tid)
        gold = row.get("image_ids")
        if need_gold and (not isinstance(gold, list) or not gold):
            raise SolutionError(
                f"{path}: record {n} (text_id {tid}) has no gold image_ids: pass the split's "
                "texts with answers (valid), not the test texts"
            )
        if gold is not None and (not isinstance(gold, list) or not all(is_int(i) for i in gold)):
            raise SolutionError(f"{path}: record {n} (text_id {tid}): image_ids must be a list of integers")
        out.append(MugeText(tid, str(row["text"]), tuple(gold or ())))
    if not out:
        raise SolutionError(f"{path} holds no {what}")
    return out
