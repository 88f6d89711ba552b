"""The offline MUGE evaluator: scores as cn_clip's official ``evaluation.py`` (``_tr`` for image->text) does, to
the digit, and rejects exactly what it rejects, naming the line, the query and the problem (``errorDetail``: all
of them). As officially, a later line for a query replaces an earlier one and unknown queries are ignored."""

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


def _lines(path: str | os.PathLike, what: str):
    """``(line number, stripped line)`` as the official script iterates a file (universal newlines)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            yield from ((n, line.strip()) for n, line in enumerate(f, 1))
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_line(n: int, line: str, qkey: str, gkey: str, k: int) -> tuple[object, list | None, str | None]:
    """``(query id or None, ids or None, problem or None)`` of one submission line, by the official rules."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None, None, f"line {n}: cannot be parsed as JSON: {line[:120]!r}"
    if not isinstance(obj, dict):
        return None, None, f"line {n}: a JSON {type(obj).__name__}, not an object with {qkey} and {gkey}"
    qid = obj.get(qkey)
    if qkey not in obj or not isinstance(qid, int):  # as officially: a bool passes isinstance(int)
        what = f"no {qkey}" if qkey not in obj else f"{qkey} {qid!r} is a {type(qid).__name__}, not an integer"
        return None, None, f"line {n}: {what}"
    ids, where = obj.get(gkey), f"{qkey} {qid} (line {n})"
    if gkey not in obj or not isinstance(ids, list):
        what = f"no {gkey}" if gkey not in obj else f"{gkey} is a {type(ids).__name__}, not a list"
        return qid, None, f"{where}: {what}"
    if len(ids) != k:
        return qid, None, f"{where}: {len(ids)} {gkey}, exactly {k} are required"
    bad = [(r, x) for r, x in enumerate(ids, 1) if not isinstance(x, int)]
    if bad:
        (r, x), more = bad[0], f" ({len(bad) - 1} more)" if len(bad) > 1 else ""
        return qid, None, f"{where}: {gkey} at rank {r} is {x!r}, a {type(x).__name__}, not an integer{more}"
    if len(set(ids)) != k:
        dups = ", ".join(map(str, sorted({x for x in ids if ids.count(x) > 1})))
        return qid, None, f"{where}: {gkey} repeat {dups}; {k} distinct are required"
    return qid, ids, None


def check_submission(path: str | os.PathLike, query_ids, *, direction: str = "t2i", k: int = K) -> Checked:
    """Check every line of a submission against the official rules; collect all problems."""
    qkey, gkey = KEYS[direction]
    out, seen, flawed = Checked(), {}, set()  # flawed: queries whose line has a problem, not missing again
    for n, line in _lines(path, "submission"):
        out.lines += 1
        qid, ids, problem = _check_line(n, line, qkey, gkey, k)
        if problem is not None:
            out.problems.append(problem)
            if qid is not None:
                flawed.add(qid)
            continue
        if qid in seen:
            out.warnings.append(
                f"{qkey} {qid} (line {n}): {qkey} {qid} already predicted on line {seen[qid]}; the later line "
                "counts (as officially)"
            )
        seen[qid] = n
        flawed.discard(qid)
        out.predictions[qid] = ids
    query_ids = set(query_ids)
    missing = sorted(query_ids - set(out.predictions) - flawed, key=lambda x: (str(type(x)), x))
    if missing:
        listed = ", ".join(map(str, missing[:20])) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        what = qkey.split("_")[0]
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
            raise ValueError(f"gold {path} line {n}: {gkey} is a {type(obj[gkey]).__name__}, not a list")
        gold[obj[qkey]] = obj[gkey]
    if not gold:
        raise ValueError(f"gold {path} has no queries")
    return gold, "t2i" if direction == "auto" else direction


def error_json(problems: Sequence[str]) -> dict:
    msg = problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
    more = f"\n... {len(problems) - MAX_DETAIL} more" if len(problems) > MAX_DETAIL else ""
    detail = "\n".join(problems[:MAX_DETAIL]) + more
    return {"errorDetail": detail, "errorMsg": msg, "score": 0, "scoreJson": {}, "success": False}


def score_files(gold_path, pred_path, *, direction: str = "auto") -> dict:
    """The official result object for a gold and a prediction file (never raises on bad input)."""
    try:
        gold, direction = read_gold(gold_path, direction)
        checked = check_submission(pred_path, gold.keys(), direction=direction)
    except (OSError, ValueError) as e:
        return error_json([str(e)])
    for w in checked.warnings:
        log.warning("%s", w)
    if checked.problems:
        return error_json(checked.problems)
    r = recall_at_k(checked.predictions, gold)  # the official object: same keys, order and arithmetic
    m = r["mean_recall"]
    scores = {"score": m, "mean_recall": m, **{key: r[key] for key in ("r1", "r5", "r10")}}
    return {"success": True, "score": m, "scoreJson": scores}


def query_ids(path: str | os.PathLike, direction: str = "t2i") -> list:
    """The query ids (``text_id``; i2t: ``image_id``) of every non-blank line of a queries or gold file, repeats
    allowed, as the official script reads gold."""
    qkey, ids = KEYS[direction][0], []
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
    """Check a submission against the query ids of ``queries_path``: a summary, or one error (the others logged)."""
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
    summary = {"success": True, "submission": str(pred_path), "queries": len(set(qids)), "lines": checked.lines}
    return {**summary, "warnings": len(checked.warnings)}


def evaluate_files(
    gold: str | os.PathLike, pred: str | os.PathLike, out: str | os.PathLike, *, direction: str = "auto"
) -> dict:
    """Score ``pred`` against ``gold`` and write the official result object to ``out``; a rejected submission is
    written too, then raised as a :class:`SolutionError`."""
    check_output(out, inputs=(gold, pred), what="OUT")
    result = score_files(gold, pred, direction=direction)
    with atomic_path(out) as tmp:  # as the official json.dump: no indent, no trailing newline
        tmp.write_text(json.dumps(result), encoding="utf-8")
    if not result["success"]:
        raise SolutionError(f"submission rejected: {result['errorMsg']} (written to {out})")
    s = result["scoreJson"]
    log.info(f"score {s['score']:.4f} (R@1 {s['r1']:.2f}, R@5 {s['r5']:.2f}, R@10 {s['r10']:.2f}) -> {out}")
    return result
