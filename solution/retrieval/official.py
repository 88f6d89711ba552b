"""Offline MUGE evaluator: scores like the official ``evaluation.py`` shipped in cn_clip, to the digit.

:func:`evaluate_files` (``python -m solution.evaluate GOLD PRED OUT``, the official script's
positional arguments) writes the same JSON to ``OUT`` (never ``GOLD`` or ``PRED`` themselves:
refused): on success
``{"success": true, "score", "scoreJson": {"score", "mean_recall", "r1", "r5", "r10"}}`` (percent);
on a rejected submission ``{"errorDetail", "errorMsg", "score": 0, "scoreJson": {}, "success":
false}``, then raises (the command exits with status 2 and one ``error:`` line). A submission is rejected exactly when
the official script rejects it (a line that is not JSON, a missing ``text_id`` or ``image_ids``,
non-integer ids, not exactly 10 ids, repeated ids, texts without a prediction), and the message
names the line, the text id and the problem (all problems are listed in ``errorDetail``). As
officially, a later line for the same text replaces an earlier one and predictions for unknown
texts are ignored (both with a warning).

Image->text (``evaluation_tr.py``'s format: ``{"image_id", "text_ids"}``) is scored the same way;
the direction is read from the gold file (``--direction`` to force it).

:func:`check_files` (``python -m solution.evaluate --check PRED --texts test_texts.jsonl``)
validates a submission before upload, when no answers exist: the same checks against the query
ids of the texts. Those ids are read with the official reader's tolerance for the gold file
(:func:`query_ids`), not the strict MUGE texts reader: the file given may be the answers
themselves, and the official script accepts a repeated query id there (the later line counts)
and needs no ``text`` field; for ``i2t`` the queries are images.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from solution.common import SolutionError, atomic_path, check_output

from .metrics import recall_at_k

log = logging.getLogger(__name__)

K = 10
KEYS = {"t2i": ("text_id", "image_ids"), "i2t": ("image_id", "text_ids")}
MAX_DETAIL = 50


@dataclass
class Checked:
    """A submission read and checked: predictions by query id, problems (empty = valid), warnings."""

    predictions: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    lines: int = 0


def _name(x) -> str:
    return type(x).__name__


def _lines(path: str | os.PathLike, what: str):
    """``(line number, stripped line)`` as the official script iterates a file (universal newlines)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                yield n, line.strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_line(n: int, line: str, qkey: str, gkey: str, k: int) -> tuple[object, list | None, str | None]:
    """``(query id or None, ids or None, problem or None)`` of one submission line, by the official rules."""
    where = f"line {n}"
    try:
        obj = json.loads(line)
    except ValueError:
        return None, None, f"{where}: cannot be parsed as JSON: {line[:120]!r}"
    if not isinstance(obj, dict):
        return None, None, f"{where}: a JSON {_name(obj)}, not an object with {qkey} and {gkey}"
    if qkey not in obj:
        return None, None, f"{where}: no {qkey}"
    qid = obj[qkey]
    if not isinstance(qid, int):  # as officially: bool passes isinstance(int)
        return None, None, f"{where}: {qkey} {qid!r} is a {_name(qid)}, not an integer"
    where = f"{qkey} {qid} (line {n})"
    if gkey not in obj:
        return qid, None, f"{where}: no {gkey}"
    ids = obj[gkey]
    if not isinstance(ids, list):
        return qid, None, f"{where}: {gkey} is a {_name(ids)}, not a list"
    if len(ids) != k:
        return qid, None, f"{where}: {len(ids)} {gkey}, exactly {k} are required"
    bad = [(r, x) for r, x in enumerate(ids, 1) if not isinstance(x, int)]
    if bad:
        r, x = bad[0]
        return (
            qid,
            None,
            (
                f"{where}: {gkey} at rank {r} is {x!r}, a {_name(x)}, not an integer"
                + (f" ({len(bad) - 1} more)" if len(bad) > 1 else "")
            ),
        )
    if len(set(ids)) != k:
        dups = sorted({x for x in ids if ids.count(x) > 1})
        return qid, None, f"{where}: {gkey} repeat {', '.join(map(str, dups))}; {k} distinct are required"
    return qid, ids, None


def check_submission(path: str | os.PathLike, query_ids, *, direction: str = "t2i", k: int = K) -> Checked:
    """Check every line of a submission against the official rules; collect all problems."""
    qkey, gkey = KEYS[direction]
    what = qkey.split("_")[0]
    out = Checked()
    seen_lines: dict = {}
    flawed = set()  # queries whose line has a problem: reported there, not again as missing
    for n, line in _lines(path, "submission"):
        out.lines += 1
        qid, ids, problem = _check_line(n, line, qkey, gkey, k)
        if problem is not None:
            out.problems.append(problem)
            if qid is not None:
                flawed.add(qid)
            continue
        if qid in seen_lines:
            out.warnings.append(
                f"{qkey} {qid} (line {n}): {qkey} {qid} already predicted on line {seen_lines[qid]}; "
                "the later line counts (as officially)"
            )
        seen_lines[qid] = n
        flawed.discard(qid)
        out.predictions[qid] = ids
    query_ids = set(query_ids)
    missing = query_ids - set(out.predictions) - flawed
    if missing:
        shown = sorted(missing, key=lambda x: (str(type(x)), x))
        listed = ", ".join(map(str, shown[:20])) + (f", ... ({len(shown) - 20} more)" if len(shown) > 20 else "")
        out.problems.append(f"{len(missing)} {what} ids of the {len(query_ids)} have no prediction: {listed}")
    extra = set(out.predictions) - query_ids
    if extra:
        out.warnings.append(
            f"{len(extra)} predicted {qkey}s are not among the queries and are ignored (e.g. {sorted(extra)[0]})"
        )
    return out


def read_gold(path: str | os.PathLike, direction: str = "auto") -> tuple[dict, str]:
    """Gold answers ``{query id: [answer ids]}`` and the direction (from the keys when ``auto``)."""
    gold: dict = {}
    for n, line in _lines(path, "gold"):
        try:
            obj = json.loads(line)
        except ValueError:
            raise ValueError(f"gold {path} line {n}: cannot be parsed as JSON: {line[:120]!r}") from None
        if direction == "auto" and isinstance(obj, dict):
            direction = "i2t" if "image_id" in obj and "text_ids" in obj else "t2i"
        qkey, gkey = KEYS["t2i" if direction == "auto" else direction]
        if not isinstance(obj, dict) or qkey not in obj or gkey not in obj:
            raise ValueError(f"gold {path} line {n}: expected an object with {qkey} and {gkey}")
        if not isinstance(obj[gkey], list):
            raise ValueError(f"gold {path} line {n}: {gkey} is a {_name(obj[gkey])}, not a list")
        gold[obj[qkey]] = obj[gkey]
    if not gold:
        raise ValueError(f"gold {path} has no queries")
    return gold, "t2i" if direction == "auto" else direction


def success_json(scores: dict) -> dict:
    """The official success object (same keys, order and arithmetic as ``report_score``)."""
    m = scores["mean_recall"]
    return {
        "success": True,
        "score": m,
        "scoreJson": {"score": m, "mean_recall": m, "r1": scores["r1"], "r5": scores["r5"], "r10": scores["r10"]},
    }


def error_json(problems: Sequence[str]) -> dict:
    msg = problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
    detail = "\n".join(problems[:MAX_DETAIL]) + (
        f"\n... {len(problems) - MAX_DETAIL} more" if len(problems) > MAX_DETAIL else ""
    )
    return {"errorDetail": detail, "errorMsg": msg, "score": 0, "scoreJson": {}, "success": False}


def score_files(gold_path, pred_path, *, direction: str = "auto", k: int = K) -> dict:
    """The official result object for a gold and a prediction file (never raises on bad input)."""
    try:
        gold, direction = read_gold(gold_path, direction)
        checked = check_submission(pred_path, gold.keys(), direction=direction, k=k)
    except (OSError, ValueError) as e:
        return error_json([str(e)])
    for w in checked.warnings:
        log.warning("%s", w)
    if checked.problems:
        return error_json(checked.problems)
    return success_json(recall_at_k(checked.predictions, gold))


def write_result(path, result: dict) -> None:
    with atomic_path(path) as tmp:  # json.dump as the official script: no indent, no trailing newline
        tmp.write_text(json.dumps(result), encoding="utf-8")


def query_ids(path: str | os.PathLike, direction: str = "t2i") -> list:
    """The query ids of a queries (or gold) file, as the official script reads the gold: the value of
    ``text_id`` (``image_id`` for i2t) of every non-blank line, repeats allowed."""
    qkey = KEYS[direction][0]
    ids = []
    try:
        for n, line in _lines(path, "queries"):
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise SolutionError(f"{path} line {n}: cannot be parsed as JSON") from None
            if not isinstance(obj, dict) or qkey not in obj:
                raise SolutionError(f"{path} line {n}: no {qkey}")
            ids.append(obj[qkey])
    except (OSError, ValueError) as e:
        raise SolutionError(str(e)) from None
    if not ids:
        raise SolutionError(f"{path} has no queries")
    return ids


def check_files(pred_path: str | os.PathLike, queries_path: str | os.PathLike, *, direction: str = "t2i") -> dict:
    """Check a submission against the query ids of ``queries_path`` (no answers needed): a summary, or
    one :class:`SolutionError` with the first problem (the others logged)."""
    qids = query_ids(queries_path, direction)
    try:
        checked = check_submission(pred_path, qids, direction=direction)
    except (OSError, ValueError) as e:
        raise SolutionError(str(e)) from None
    for w in checked.warnings:
        log.warning("%s", w)
    if checked.problems:
        for p in checked.problems[1:MAX_DETAIL]:
            log.error("%s", p)
        raise SolutionError(error_json(checked.problems)["errorMsg"])
    return {
        "success": True,
        "submission": str(pred_path),
        "queries": len(set(qids)),
        "lines": checked.lines,
        "warnings": len(checked.warnings),
    }


def evaluate_files(
    gold: str | os.PathLike, pred: str | os.PathLike, out: str | os.PathLike, *, direction: str = "auto"
) -> dict:
    """Score ``pred`` against ``gold`` and write the official result object to ``out``; a rejected
    submission is written too, then raised as a :class:`SolutionError`."""
    check_output(out, inputs=(gold, pred), what="OUT")  # never replace the answers or the submission
    result = score_files(gold, pred, direction=direction)
    write_result(out, result)
    if not result["success"]:
        raise SolutionError(f"submission rejected: {result['errorMsg']} (written to {out})")
    log.info(
        "score %.4f (R@1 %.2f, R@5 %.2f, R@10 %.2f) -> %s",
        result["score"],
        result["scoreJson"]["r1"],
        result["scoreJson"]["r5"],
        result["scoreJson"]["r10"],
        out,
    )
    return result
