"""Failure browser: one self-contained HTML page showing each query's retrieved images, worst queries first.

Each query shows its text, its top-10 thumbnails in rank order (gold framed), the gold images it
missed and its hits at 1/5/10; with a second submission B, both rows, and the queries B fixes or
breaks: a higher or lower per-query mean of hit@1/5/10 than A's. The page is ``failures.html`` with
a JSON blob (each image id's thumbnail once, as base64 JPEG) that its inline script renders a page
of queries at a time, so it needs no server or network.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from collections import Counter
from importlib.resources import files

import numpy as np
from PIL import Image
from tqdm import tqdm

from solution.common import SolutionError, atomic_path, check_output
from solution.data.lmdb_io import LMDBSplit
from solution.formats.muge import read_texts
from solution.retrieval.metrics import per_query_recall, query_hits, recall_from_hits
from solution.retrieval.official import check_submission, error_json, read_gold
from solution.stats import paired_bootstrap

from .significance import CI, N_RESAMPLES, SEED

log = logging.getLogger(__name__)

THUMB, QUALITY = 96, 70
PLACEHOLDER = "__DATA__"


def read_submission(path: str | os.PathLike, query_ids: list[int]) -> dict[int, list[int]]:
    """``{text id: its 10 image ids}`` checked by the official evaluator's rules; text ids not among the queries are
    refused (a submission for other texts)."""
    try:
        checked = check_submission(path, query_ids)
    except (OSError, ValueError) as e:
        raise SolutionError(str(e)) from None
    extra = sorted(set(checked.predictions) - set(query_ids))
    if extra:
        raise SolutionError(f"{path}: {len(extra)} text ids are not in the texts (e.g. {extra[0]}): wrong --texts?")
    if checked.problems:
        raise SolutionError(f"{path}: {error_json(checked.problems)['errorMsg']}")
    return checked.predictions


def read_answers(texts, answers: str | os.PathLike | None) -> dict[int, list[int]]:
    """Gold image ids of every text, in the texts' order: from ``answers`` when given, else from the texts."""
    if answers is None:
        gold = {t.text_id: list(t.image_ids) for t in texts}
    else:
        try:
            gold = read_gold(answers, "t2i")[0]
        except (OSError, ValueError) as e:
            raise SolutionError(str(e)) from None
    lacking = [t.text_id for t in texts if not gold.get(t.text_id)]
    if lacking:
        where = f"in {answers}" if answers else "in the texts: pass --answers GOLD.jsonl"
        raise SolutionError(f"{len(lacking)} texts have no gold image ids {where} (e.g. text_id {lacking[0]})")
    return {t.text_id: gold[t.text_id] for t in texts}


def thumbnail(b64: bytes | None, size: int = THUMB, quality: int = QUALITY) -> str | None:
    """Base64 of a JPEG at most ``size`` px a side, or None for a missing or undecodable image."""
    if b64 is None:
        return None
    try:
        with Image.open(io.BytesIO(base64.urlsafe_b64decode(b64))) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale directly
            im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnails(split: LMDBSplit, ids, progress: bool = False) -> dict[int, str | None]:
    """Each id's thumbnail, once; ids missing from the LMDB (or undecodable) map to None (a placeholder)."""
    out = {i: thumbnail(split.image_b64(i)) for i in tqdm(ids, desc="thumbnails", unit="img", disable=not progress)}
    bad = [i for i, t in out.items() if t is None]
    if bad:
        log.warning(
            "%d image ids are missing from %s or undecodable (shown as placeholders), e.g. %s",
            len(bad),
            split.split_dir,
            bad[0],
        )
    return out


def _system(name: str, pred: dict, gold: dict) -> dict:
    hits = query_hits(pred, gold)
    in_top = Counter(len(set(pred[q]) & set(g)) for q, g in gold.items())
    return {"name": name, "hits": hits, "recall": recall_from_hits(hits), "gold_in_top10": dict(sorted(in_top.items()))}


def build_page(texts, gold: dict, systems: list[tuple[str, dict]], split: LMDBSplit, *, progress=False) -> dict:
    """The page's data: queries worst first (by the first system's per-query mean recall, then text id), summaries,
    the change B makes to each query (+1 fixed, -1 broken, 0), and the thumbnails."""
    text_of = {t.text_id: t.text for t in texts}
    runs = [_system(name, pred, gold) for name, pred in systems]
    values = [per_query_recall(r["hits"]) for r in runs]
    qids = list(gold)
    change = np.sign(values[-1] - values[0]).astype(int)
    summary = {"systems": [{k: r[k] for k in ("name", "recall", "gold_in_top10")} for r in runs]}
    if len(runs) == 2:
        bs = paired_bootstrap(runs[1]["hits"], runs[0]["hits"], n_resamples=N_RESAMPLES, seed=SEED, ci=CI)
        summary["against"] = {
            "fixed": int((change > 0).sum()),
            "broken": int((change < 0).sum()),
            "diff": bs.diff,
            "low": bs.low,
            "high": bs.high,
            "n_resamples": N_RESAMPLES,
            "ci": CI,
        }
    queries = []
    for i in np.lexsort((qids, values[0])):
        q = qids[i]
        rows = [{"ids": pred[q], "hits": r["hits"][i].astype(int).tolist()} for (_, pred), r in zip(systems, runs)]
        queries.append({"id": q, "text": text_of[q], "gold": gold[q], "rows": rows, "change": int(change[i])})
    ids = dict.fromkeys(x for q in queries for x in [*(i for r in q["rows"] for i in r["ids"]), *q["gold"]])
    return {"summary": summary, "queries": queries, "images": thumbnails(split, list(ids), progress)}


def render(page: dict) -> str:
    """The HTML page with ``page`` embedded as JSON (``<`` escaped so no text can close the script)."""
    blob = json.dumps(page, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    template = files(__package__).joinpath("failures.html").read_text(encoding="utf-8")
    return template.replace(PLACEHOLDER, blob, 1)


def inspect(submission, texts, image_data, output, *, against=None, answers=None, progress=False) -> dict:
    """Write the failure browser of ``submission`` (and ``against``) to ``output``; returns the page's summary."""
    inputs = [p for p in (submission, against) if p is not None]
    check_output(output, inputs=(*inputs, texts, answers), what="--output")
    queries = read_texts(texts)
    gold = read_answers(queries, answers)
    systems = [(str(p), read_submission(p, list(gold))) for p in inputs]
    split = LMDBSplit(image_data, need_pairs=False)
    try:
        page = build_page(queries, gold, systems, split, progress=progress)
    finally:
        split.close()
    with atomic_path(output) as tmp:
        tmp.write_text(render(page), encoding="utf-8")
    log.info(
        "wrote %s: %d queries, %d images, %.1f MB",
        output,
        len(page["queries"]),
        len(page["images"]),
        os.path.getsize(output) / 1e6,
    )
    return page["summary"]
