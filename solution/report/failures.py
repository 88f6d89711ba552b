"""Failure browser: one self-contained page (``failures.html`` plus a JSON blob holding each image's thumbnail once)
of each query's text, top-10 thumbnails (gold framed), missed gold and hits at 1/5/10, worst first; with a second
submission B, both rows and the queries B fixes or breaks (a higher or lower per-query mean recall than A's)."""

import base64
import contextlib
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

log = logging.getLogger(__name__)

THUMB, QUALITY = 96, 70


def read_submission(path: str | os.PathLike, query_ids: list[int]) -> dict[int, list[int]]:
    """``{text id: its 10 image ids}`` checked by the official rules; text ids not among the queries are refused."""
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
    try:
        gold = read_gold(answers, "t2i")[0] if answers else {t.text_id: list(t.image_ids) for t in texts}
    except (OSError, ValueError) as e:
        raise SolutionError(str(e)) from None
    lacking = [t.text_id for t in texts if not gold.get(t.text_id)]
    if lacking:
        where = f"in {answers}" if answers else "in the texts: pass --answers GOLD.jsonl"
        raise SolutionError(f"{len(lacking)} texts have no gold image ids {where} (e.g. text_id {lacking[0]})")
    return {t.text_id: gold[t.text_id] for t in texts}


def thumbnail(b64: bytes | None) -> str | None:
    """Base64 of a JPEG at most ``THUMB`` px a side, or None for a missing or undecodable image."""
    if b64 is None:
        return None
    try:
        with Image.open(io.BytesIO(base64.urlsafe_b64decode(b64))) as im:
            im.draft("RGB", (THUMB, THUMB))  # JPEG: decode at a reduced scale directly
            im = im.convert("RGB")
        im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=QUALITY, optimize=True)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnails(split: LMDBSplit, ids, progress: bool = False) -> dict[int, str | None]:
    """Each id's thumbnail, once; ids missing from the LMDB (or undecodable) map to None (a placeholder)."""
    out = {i: thumbnail(split.image_b64(i)) for i in tqdm(ids, desc="thumbnails", unit="img", disable=not progress)}
    bad = [i for i, t in out.items() if t is None]
    if bad:
        log.warning(f"{len(bad)} image ids are missing from {split.split_dir} or undecodable, e.g. {bad[0]}")
    return out


def build_page(texts, gold: dict, systems: list[tuple[str, dict]], split: LMDBSplit, *, progress=False) -> dict:
    """The page's data: queries worst first (by the first system's per-query mean recall, then text id), summaries,
    the change B makes to each query (+1 fixed, -1 broken, 0), and the thumbnails."""
    text_of, qids = {t.text_id: t.text for t in texts}, list(gold)
    hits = [query_hits(pred, gold) for _, pred in systems]
    values = [per_query_recall(h) for h in hits]
    change = np.sign(values[-1] - values[0]).astype(int)
    summary = {"systems": []}
    for (name, pred), h in zip(systems, hits):
        in_top = Counter(len(set(pred[q]) & set(g)) for q, g in gold.items())
        summary["systems"].append(
            {"name": name, "recall": recall_from_hits(h), "gold_in_top10": dict(sorted(in_top.items()))}
        )
    if len(systems) == 2:
        bs = paired_bootstrap(hits[1], hits[0])
        fixed, broken = int((change > 0).sum()), int((change < 0).sum())
        summary["against"] = dict(
            fixed=fixed, broken=broken, diff=bs.diff, low=bs.low, high=bs.high, n_resamples=bs.n_resamples, ci=bs.ci
        )
    queries = []
    for i in np.lexsort((qids, values[0])):
        q = qids[i]
        rows = [{"ids": pred[q], "hits": h[i].astype(int).tolist()} for (_, pred), h in zip(systems, hits)]
        queries.append({"id": q, "text": text_of[q], "gold": gold[q], "rows": rows, "change": int(change[i])})
    ids = dict.fromkeys(x for q in queries for x in [*(i for r in q["rows"] for i in r["ids"]), *q["gold"]])
    return {"summary": summary, "queries": queries, "images": thumbnails(split, list(ids), progress)}


def inspect(submission, texts, image_data, output, *, against=None, answers=None, progress=False) -> dict:
    """Write the failure browser of ``submission`` (and ``against``) to ``output``; returns the page's summary."""
    inputs = [p for p in (submission, against) if p is not None]
    check_output(output, inputs=(*inputs, texts, answers), what="--output")
    queries = read_texts(texts)
    gold = read_answers(queries, answers)
    systems = [(str(p), read_submission(p, list(gold))) for p in inputs]
    with contextlib.closing(LMDBSplit(image_data, need_pairs=False)) as split:
        page = build_page(queries, gold, systems, split, progress=progress)
    # the page as JSON inside a <script>: "<" escaped so that no text can close it
    blob = json.dumps(page, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    html = files(__package__).joinpath("failures.html").read_text(encoding="utf-8").replace("__DATA__", blob, 1)
    with atomic_path(output) as tmp:
        tmp.write_text(html, encoding="utf-8")
    size = os.path.getsize(output) / 1e6
    log.info(f"wrote {output}: {len(page['queries'])} queries, {len(page['images'])} images, {size:.1f} MB")
    return page["summary"]
