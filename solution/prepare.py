"""Inputs -> cleaned images + texts -> cn_clip's LMDB layout, with a report of everything skipped.

Three input formats end in the same shape:

1. MUGE / Tianchi (what cn_clip's ``build_lmdb_dataset.py`` reads): ``DIR/{split}_imgs.tsv``
   (``image_id<TAB>base64``) and ``DIR/{split}_texts.jsonl`` (``{"text_id", "text", "image_ids"}``;
   test texts may lack ``image_ids``).
2. ``--csv FILE``: a CSV (or ``.tsv``) with columns ``text,image_path`` and optionally ``text_id``,
   ``image_id``, ``split``; paths are relative to ``--images-dir`` or else to the CSV's folder.
3. ``--images-dir DIR --captions FILE``: a folder of images plus a JSON-lines file of
   ``{"image": relative path, "text": ..., ["text_id", "image_id", "split"]}``.

In 2 and 3, ``{split}`` in the file name selects one file per split; otherwise a ``split``
column/key, or else every row belongs to the first split named. Rows with the same text in a
split form one query. For 2 and 3 the MUGE files (``DIR/{split}_imgs.tsv`` of the cleaned images,
``DIR/{split}_texts.jsonl``) are written too.

Output: ``LMDB_DIR/{split}/imgs`` and ``LMDB_DIR/{split}/pairs`` (``LMDB_DIR`` defaults to
``DIR/lmdb``), exactly as cn_clip's builder writes them, plus ``LMDB_DIR/{split}/report.json``.
Images are cleaned in parallel (``solution.images``); bad images, duplicate ids and texts
whose images are all missing are skipped and listed in the report, never a crash.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from .common import SolutionError, atomic_path, run_cli, write_json, write_jsonl
from .images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, REASONS, clean_b64, clean_image
from .lmdb_io import write_split

log = logging.getLogger(__name__)

SKIP_REASONS = {**REASONS, "missing_file": "the image file does not exist or cannot be read",
                "malformed_line": "the line is not image_id<TAB>base64", "bad_id": "the image id is not an integer",
                "duplicate_id": "an image with this id was already stored (the first one wins)"}
TEXT_REASONS = {"no_images": "none of its images survived cleaning", "duplicate_text_id": "text_id seen before",
                "malformed": "not a valid text record", "empty_text": "the text is empty"}
LIST_CONVERTED = 1000  # list at most this many converted images by id in a report
MIN_PARALLEL = 256  # fewer images than this are cleaned in-process (starting a pool costs more)


@dataclass
class Text:
    text_id: int
    text: str
    image_ids: list[int] | None  # None: unlabelled (test queries without image_ids, or [])


@dataclass
class SplitInput:
    name: str
    texts: list[Text]
    tsv: Path | None = None                       # format 1
    files: list[tuple[int, str]] | None = None    # formats 2/3: (image_id, path)
    problems: list[dict] = field(default_factory=list)  # texts refused while reading
    duplicate_text_ids: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- reading inputs


def _as_text(obj, where: str, split: SplitInput, seen: set[int]) -> Text | None:
    def bad(reason, detail):
        split.problems.append({"where": where, "text_id": obj.get("text_id") if isinstance(obj, dict) else None,
                               "reason": reason, "detail": detail})

    if not isinstance(obj, dict) or "text_id" not in obj or "text" not in obj:
        return bad("malformed", "needs text_id and text")
    try:
        text_id = int(obj["text_id"])
        image_ids = [int(i) for i in obj.get("image_ids") or ()] or None  # none / []: unlabelled
    except (TypeError, ValueError):
        return bad("malformed", "text_id and image_ids must be integers")
    text = str(obj["text"]).strip()
    if not text:
        return bad("empty_text", TEXT_REASONS["empty_text"])
    if text_id in seen:
        split.duplicate_text_ids.append(text_id)
        return bad("duplicate_text_id", "text_id seen before in this split; the first one wins")
    seen.add(text_id)
    return Text(text_id, text, image_ids)


def read_muge(data_dir: Path, name: str) -> SplitInput:
    tsv, texts_path = data_dir / f"{name}_imgs.tsv", data_dir / f"{name}_texts.jsonl"
    for p in (tsv, texts_path):
        if not p.is_file():
            raise SolutionError(f"{p} not found: --data-dir needs MUGE files {name}_imgs.tsv and {name}_texts.jsonl "
                                f"(or give --csv FILE, or --images-dir DIR --captions FILE)")
    split, seen = SplitInput(name, [], tsv=tsv), set()
    with open(texts_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                split.problems.append({"where": f"{texts_path.name}:{lineno}", "text_id": None,
                                       "reason": "malformed", "detail": f"not JSON ({e.msg})"})
                continue
            t = _as_text(obj, f"{texts_path.name}:{lineno}", split, seen)
            if t:
                split.texts.append(t)
    if not split.texts and split.problems:
        raise SolutionError(f"{texts_path}: no valid text record (first problem: {split.problems[0]['detail']})")
    return split


_IMAGE_KEYS = ("image_path", "image", "path", "file", "file_name", "filename", "img")
_TEXT_KEYS = ("text", "caption", "query")


def _pick(row: dict, keys: Sequence[str]):
    for k in keys:
        if row.get(k) not in (None, ""):
            return row[k]
    return None


def _read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path.name}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SolutionError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        cols = [c.strip() for c in reader.fieldnames or []]
        if not any(c in cols for c in _TEXT_KEYS) or not any(c in cols for c in _IMAGE_KEYS):
            raise SolutionError(f"{path}: needs columns text and image_path (found: {', '.join(cols) or 'none'})")
        for lineno, row in enumerate(reader, 2):
            yield f"{path.name}:{lineno}", {k.strip(): v for k, v in row.items() if k}


def read_table(table: str, splits: Sequence[str], base_dir: Path | None) -> dict[str, SplitInput]:
    """Formats 2 and 3: rows of (text, image path[, ids, split]) -> one SplitInput per split.

    Rows with the same ``text_id`` (or, without one, the same text) in a split form one query.
    Missing ids are assigned above the largest given one: one id per distinct image file.
    """
    files = [(s, Path(table.replace("{split}", s))) for s in splits] if "{split}" in table else [(None, Path(table))]
    out: dict[str, SplitInput] = {}
    rows: list[tuple[str, str, str, int | None, int | None]] = []  # split, text, path, text_id, image_id
    for fixed_split, path in files:
        if not path.is_file():
            raise SolutionError(f"{path} not found")
        root = base_dir or path.parent
        for where, row in _read_rows(path):
            name = fixed_split or str(row.get("split") or splits[0]).strip()
            split = out.setdefault(name, SplitInput(name, [], files=[]))
            text, rel = _pick(row, _TEXT_KEYS), _pick(row, _IMAGE_KEYS)
            if text is None or rel is None or not str(text).strip():
                split.problems.append({"where": where, "text_id": row.get("text_id"), "reason": "malformed",
                                       "detail": "needs a non-empty text and an image path"})
                continue
            try:
                tid = None if row.get("text_id") in (None, "") else int(row["text_id"])
                iid = None if row.get("image_id") in (None, "") else int(row["image_id"])
            except (TypeError, ValueError):
                split.problems.append({"where": where, "text_id": row.get("text_id"), "reason": "malformed",
                                       "detail": "image_id and text_id must be integers"})
                continue
            rows.append((name, str(text).strip(), str((root / str(rel)).resolve()), tid, iid))

    next_image = max([r[4] for r in rows if r[4] is not None], default=0) + 1
    next_text = max([r[3] for r in rows if r[3] is not None], default=0) + 1
    path_ids: dict[str, int] = {}
    groups: dict[str, dict[tuple, dict]] = {}
    seen_files: set[tuple[str, int, str]] = set()
    for name, text, path, tid, iid in rows:
        if iid is None:
            if path not in path_ids:
                path_ids[path], next_image = next_image, next_image + 1
            iid = path_ids[path]
        g = groups.setdefault(name, {}).setdefault(("id", tid) if tid is not None else ("text", text),
                                                   {"text_id": tid, "text": text, "image_ids": []})
        if iid not in g["image_ids"]:
            g["image_ids"].append(iid)
        if (name, iid, path) not in seen_files:
            seen_files.add((name, iid, path))
            out[name].files.append((iid, path))
    for name, gs in groups.items():
        seen: set[int] = set()
        for g in gs.values():
            if g["text_id"] is None:
                g["text_id"], next_text = next_text, next_text + 1
            t = _as_text(g, f"text {g['text']!r}", out[name], seen)
            if t:
                out[name].texts.append(t)
    return out


# ---------------------------------------------------------------- validation split


def split_off_valid(texts: list[Text], fraction: float, seed: int) -> tuple[list[Text], list[Text]]:
    """Split labelled texts so no query text (case/space-normalised) is in both parts."""
    import numpy as np
    from sklearn.model_selection import GroupShuffleSplit

    if not 0.0 < fraction < 1.0:
        raise SolutionError(f"--make-valid takes a fraction between 0 and 1, got {fraction}")
    labelled = [t for t in texts if t.image_ids]
    groups = ["".join(t.text.lower().split()) for t in labelled]
    if len(set(groups)) < 2:
        raise SolutionError("--make-valid needs at least two distinct labelled queries")
    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    train_idx, valid_idx = next(gss.split(np.zeros(len(labelled)), groups=groups))
    valid = [labelled[i] for i in sorted(valid_idx)]
    valid_ids = {t.text_id for t in valid}
    return [t for t in texts if t.text_id not in valid_ids], valid


# ---------------------------------------------------------------- cleaning workers

_OPTS: dict = {}


def _init_worker(opts: dict) -> None:
    _OPTS.clear()
    _OPTS.update(opts)


def _clean_tsv_line(item: tuple[int, bytes]) -> tuple:
    """(line number, raw line) -> (where, image_id, status, reason, detail, actions, format, base64)."""
    lineno, line = item
    where = f"line {lineno}"
    try:
        parts = line.rstrip(b"\r\n").split(b"\t")
        if len(parts) != 2:
            return (where, None, "skipped", "malformed_line", f"expected 2 tab-separated fields, found {len(parts)}",
                    [], None, None)
        try:
            image_id = int(parts[0])
        except ValueError:
            return (where, None, "skipped", "bad_id", f"image id {parts[0][:40]!r} is not an integer", [], None, None)
        r = clean_b64(parts[1], **_OPTS)
        return (where, image_id, r.status, r.reason, r.detail, r.actions, r.format, r.data)
    except Exception as e:  # noqa: BLE001 - never let one line kill the pool
        return (where, None, "skipped", "corrupt", f"{type(e).__name__}: {e}", [], None, None)


def _clean_file(item: tuple[int, str]) -> tuple:
    image_id, path = item
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return (path, image_id, "skipped", "missing_file", f"{type(e).__name__}: {e.strerror or e}", [], None, None)
    try:
        r = clean_image(data, **_OPTS)
        out = base64.urlsafe_b64encode(r.data) if r.ok else None
        return (path, image_id, r.status, r.reason, r.detail, r.actions, r.format, out)
    except Exception as e:  # noqa: BLE001
        return (path, image_id, "skipped", "corrupt", f"{type(e).__name__}: {e}", [], None, None)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def _cleaned(func, items: Iterable, workers: int, opts: dict, chunksize: int = 32):
    """Yield an iterator of ``func(item)`` results in input order, computed on ``workers`` processes.

    The input is consumed lazily (at most a bounded window is in flight), so a huge TSV never
    sits in memory.
    """
    if workers <= 1:
        _init_worker(opts)
        yield map(func, items)
        return
    window = threading.BoundedSemaphore(chunksize * workers * 8)

    def throttled():
        for item in items:
            window.acquire()
            yield item

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(opts,)) as pool:
        def results():
            for r in pool.imap(func, throttled(), chunksize):
                window.release()
                yield r
        yield results()


def _tsv_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            n += chunk.count(b"\n")
    return n


# ---------------------------------------------------------------- one split


class _Ledger:
    """Counts and lists for one output split's report."""

    def __init__(self, name: str, texts: list[Text]):
        self.name, self.texts = name, texts
        self.counts = Counter()
        self.by_reason, self.by_action, self.formats = Counter(), Counter(), Counter()
        self.skipped: list[dict] = []
        self.duplicates: list[dict] = []
        self.converted: list[dict] = []
        self.kept_ids: set[int] = set()

    def image(self, where, image_id, status, reason, detail, actions, fmt) -> None:
        self.counts["images_total"] += 1
        if fmt:
            self.formats[fmt] += 1
        if status == "skipped":
            entry = {"image_id": image_id, "where": where, "reason": reason, "detail": detail}
            (self.duplicates if reason == "duplicate_id" else self.skipped).append(entry)
            self.by_reason[reason] += 1
            return
        self.kept_ids.add(image_id)
        self.counts[status] += 1
        if status == "converted":
            self.by_action.update(actions)
            if len(self.converted) < LIST_CONVERTED:
                self.converted.append({"image_id": image_id, "format": fmt, "actions": actions})

    def pairs(self, skipped_texts: list[dict], partial: list[dict]) -> Iterator[tuple[int, int, str]]:
        for t in self.texts:
            if t.image_ids is None:
                self.counts["texts_unlabelled"] += 1
                continue
            present = [i for i in t.image_ids if i in self.kept_ids]
            missing = [i for i in t.image_ids if i not in self.kept_ids]
            if not present:
                skipped_texts.append({"text_id": t.text_id, "reason": "no_images",
                                      "detail": f"none of its images survived: {missing}" if missing else "no image_ids"})
                continue
            if missing:
                partial.append({"text_id": t.text_id, "missing_image_ids": missing})
                self.counts["pairs_dropped"] += len(missing)
            self.counts["texts_kept"] += 1
            for image_id in present:
                yield image_id, t.text_id, t.text


def _report(ledger: _Ledger, split: SplitInput | None, skipped_texts, partial, num_images, num_samples,
            seconds, source: str, out_dir: Path) -> dict:
    c = ledger.counts
    problems = split.problems if split else []
    return {
        "split": ledger.name, "source": source, "lmdb": str(out_dir), "num_images": num_images,
        "num_samples": num_samples,
        "images": {"total": c["images_total"], "kept": c["kept"], "converted": c["converted"],
                   "skipped": len(ledger.skipped), "duplicates": len(ledger.duplicates),
                   "skipped_by_reason": dict(ledger.by_reason), "converted_by_action": dict(ledger.by_action),
                   "formats": dict(ledger.formats)},
        "texts": {"total": len(ledger.texts) + len(problems), "kept": c["texts_kept"],
                  "unlabelled": c["texts_unlabelled"], "skipped": len(skipped_texts) + len(problems),
                  "with_missing_images": len(partial)},
        "pairs": {"written": num_samples, "dropped_missing_image": c["pairs_dropped"]},
        "skipped_images": ledger.skipped,
        "duplicate_images": ledger.duplicates,
        "skipped_texts": problems + skipped_texts,
        "texts_with_missing_images": partial,
        "converted_images": ledger.converted,
        "converted_images_listed": len(ledger.converted),
        "seconds": round(seconds, 3),
        "images_per_second": round(c["images_total"] / seconds, 1) if seconds > 0 else None,
    }


def _summary_line(r: dict) -> str:
    im, tx = r["images"], r["texts"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(im["skipped_by_reason"].items()))
    return (f"{r['split']}: {im['total']} images -> {r['num_images']} stored ({im['kept']} kept, {im['converted']} "
            f"converted, {im['skipped']} skipped{': ' + reasons if reasons else ''}, {im['duplicates']} duplicate ids); "
            f"{tx['total']} texts -> {tx['kept']} with images, {tx['unlabelled']} unlabelled, {tx['skipped']} skipped; "
            f"{r['num_samples']} pairs in {r['lmdb']} ({r['images_per_second']} images/s)")


@contextlib.contextmanager
def _building(final: Path) -> Iterator[Path]:
    """Build a split in a sibling temp dir and swap it in on success: never a half-written LMDB."""
    tmp = final.parent / f".{final.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _process(split: SplitInput, outputs: list[tuple[str, list[Text]]], lmdb_dir: Path, muge_dir: Path | None,
             opts: dict, workers: int, progress: bool, source: str) -> dict[str, dict]:
    """Clean ``split``'s images once and write one LMDB per output (name, texts), routing images by text."""
    t0 = time.perf_counter()
    ledgers = [_Ledger(name, texts) for name, texts in outputs]
    owner: dict[int, int] = {}  # image id -> index of the output that gets it (others: the first output)
    for k, led in enumerate(ledgers[1:], 1):
        for t in led.texts:
            for i in t.image_ids or ():
                owner[i] = k
    shared = {i for t in ledgers[0].texts for i in (t.image_ids or ()) if i in owner}
    first_where: dict[int, str] = {}

    if split.tsv is not None:
        items, func, total = _tsv_lines(split.tsv), _clean_tsv_line, _count_lines(split.tsv)
    else:
        items, func, total = iter(split.files), _clean_file, len(split.files)

    with contextlib.ExitStack() as stack:
        dirs = [stack.enter_context(_building(lmdb_dir / led.name)) for led in ledgers]
        spools = [stack.enter_context(open(d / "spool.tsv", "wb")) for d in dirs[1:]]
        muge = [stack.enter_context(atomic_path(muge_dir / f"{led.name}_imgs.tsv")) for led in ledgers] if muge_dir else []
        muge_f = [stack.enter_context(open(p, "wb")) for p in muge]
        results = stack.enter_context(_cleaned(func, items, workers if total >= MIN_PARALLEL else 1, opts))
        bar = stack.enter_context(tqdm(total=total, desc=f"cleaning {split.name}", unit="img", disable=not progress,
                                       mininterval=1.0))

        def first_images() -> Iterator[tuple[int, bytes]]:
            for where, image_id, status, reason, detail, actions, fmt, data in results:
                bar.update(1)
                targets = [owner.get(image_id, 0)] + ([0] if image_id in shared else [])
                if status != "skipped" and image_id in first_where:
                    status, reason = "skipped", "duplicate_id"
                    detail = f"image id already stored from {first_where[image_id]}; the first one wins"
                for k in targets:
                    ledgers[k].image(where, image_id, status, reason, detail, actions, fmt)
                if status == "skipped":
                    continue
                first_where[image_id] = where
                for k in targets:
                    line = b"%d\t%s\n" % (image_id, data)
                    if muge_f:
                        muge_f[k].write(line)
                    if k:
                        spools[k - 1].write(line)
                if 0 in targets:
                    yield image_id, data

        def spooled(path: Path) -> Iterator[tuple[int, bytes]]:
            with open(path, "rb") as f:
                for line in f:
                    i, d = line.rstrip(b"\n").split(b"\t")
                    yield int(i), d

        reports = {}
        for k, (led, d) in enumerate(zip(ledgers, dirs)):
            skipped_texts, partial = [], []
            if k:
                spools[k - 1].close()
            n_img, n_pairs = write_split(d, first_images() if k == 0 else spooled(d / "spool.tsv"),
                                         led.pairs(skipped_texts, partial))
            (d / "spool.tsv").unlink(missing_ok=True)
            if muge_dir:
                kept = [{"text_id": t.text_id, "text": t.text, "image_ids": [i for i in t.image_ids if i in led.kept_ids]}
                        for t in led.texts if t.image_ids and any(i in led.kept_ids for i in t.image_ids)]
                write_jsonl(muge_dir / f"{led.name}_texts.jsonl", kept)
            rep = _report(led, split if k == 0 else None, skipped_texts, partial, n_img, n_pairs,
                          time.perf_counter() - t0, source if k == 0 else f"{source}, --make-valid from {split.name}",
                          lmdb_dir / led.name)
            write_json(d / "report.json", rep)
            reports[led.name] = rep
        bar.close()
    for rep in reports.values():
        log.info("%s", _summary_line(rep))
    return reports


# ---------------------------------------------------------------- API + CLI


def prepare(data_dir, splits: Sequence[str] | str = ("train", "valid", "test"), *, lmdb_dir=None,
            max_side: int | None = None, quality: int = DEFAULT_QUALITY, max_pixels: int | None = DEFAULT_MAX_PIXELS,
            workers: int | None = None, make_valid: float | None = None, valid_name: str = "valid",
            csv: str | os.PathLike | None = None, images_dir=None, captions=None, seed: int = 0,
            progress: bool = True) -> dict[str, dict]:
    """Build ``LMDB_DIR/{split}`` for each split; returns {split: report} (also in each report.json)."""
    data_dir = Path(data_dir)
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",")]
    splits = list(dict.fromkeys(s for s in splits if s))
    if not splits:
        raise SolutionError("no split given (e.g. --splits train,valid,test)")
    if max_side is not None and max_side < 8:
        raise SolutionError(f"--max-side {max_side} is too small (at least 8)")
    if not 1 <= quality <= 100:
        raise SolutionError(f"--quality must lie in 1..100, got {quality}")
    if captions and not images_dir and not csv:
        raise SolutionError("--captions needs --images-dir (the folder the image paths are relative to)")
    if images_dir and not (captions or csv):
        raise SolutionError("--images-dir needs --captions FILE (or --csv FILE)")
    lmdb_dir = Path(lmdb_dir) if lmdb_dir else data_dir / "lmdb"

    if csv or captions:
        source = "csv" if csv else "folder"
        base = Path(images_dir) if images_dir else None
        if base is not None and not base.is_dir():
            raise SolutionError(f"--images-dir {base} is not a directory")
        inputs = read_table(str(csv or captions), splits, base)
        muge_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
    else:
        if not data_dir.is_dir():
            raise SolutionError(f"--data-dir {data_dir} is not a directory")
        source, muge_dir = "muge", None
        wanted = [s for s in splits if not (make_valid and s == valid_name)]
        inputs = {s: read_muge(data_dir, s) for s in wanted}

    plan: list[tuple[SplitInput, list[tuple[str, list[Text]]]]] = []
    for name in splits:
        if make_valid and name == valid_name:
            continue
        if name not in inputs:
            raise SolutionError(f"no rows for split {name!r} in {csv or captions} (splits found: {', '.join(inputs)})")
        split = inputs[name]
        outputs = [(name, split.texts)]
        if make_valid and name == splits[0]:
            if valid_name in inputs and inputs[valid_name].texts:
                raise SolutionError(f"the input already has a {valid_name!r} split; drop --make-valid")
            train_t, valid_t = split_off_valid(split.texts, make_valid, seed)
            outputs = [(name, train_t), (valid_name, valid_t)]
        plan.append((split, outputs))

    opts = {"max_side": max_side, "quality": quality, "max_pixels": max_pixels}
    workers = default_workers() if workers is None else max(0, int(workers))
    reports: dict[str, dict] = {}
    for split, outputs in plan:
        reports.update(_process(split, outputs, lmdb_dir, muge_dir, opts, workers, progress, source))
    total = sum(r["images"]["total"] for r in reports.values())
    skipped = sum(r["images"]["skipped"] + r["images"]["duplicates"] for r in reports.values())
    log.info("prepared %s in %s: %d images, %d stored, %d skipped (details in each report.json)",
             ",".join(reports), lmdb_dir, total, sum(r["num_images"] for r in reports.values()), skipped)
    return reports



def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m solution.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", required=True,
                   help="MUGE directory to read (format 1) or to write the MUGE files into (formats 2/3)")
    p.add_argument("--splits", required=True, help="comma-separated splits, e.g. train,valid,test")
    p.add_argument("--lmdb-dir", "--lmdb_dir", dest="lmdb_dir", help="output directory (default DATA_DIR/lmdb)")
    p.add_argument("--max-side", type=int, help="shrink images so the longer side is at most N px (JPEG re-encode)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of re-encoded images")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images declaring more pixels are skipped as decompression bombs")
    p.add_argument("--workers", type=int, help="cleaning processes (default: all cores; 0 or 1: in-process)")
    p.add_argument("--make-valid", type=float, metavar="FRACTION",
                   help="split this fraction of the first split's queries off as a validation split")
    p.add_argument("--valid-name", default="valid", help="name of the split --make-valid creates")
    p.add_argument("--seed", type=int, default=0, help="seed for --make-valid")
    p.add_argument("--csv", help="format 2: CSV/TSV with text,image_path[,text_id,image_id,split]; "
                                 "'{split}' in the name = one file per split")
    p.add_argument("--images-dir", help="format 3: folder of images (paths in --captions/--csv are relative to it)")
    p.add_argument("--captions", help="format 3: JSON lines {image, text[, text_id, image_id, split]}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    reports = prepare(a.data_dir, a.splits, lmdb_dir=a.lmdb_dir, max_side=a.max_side, quality=a.quality,
                      max_pixels=a.max_pixels, workers=a.workers, make_valid=a.make_valid, valid_name=a.valid_name,
                      csv=a.csv, images_dir=a.images_dir, captions=a.captions, seed=a.seed,
                      progress=not a.no_progress)
    print(json.dumps({s: {"num_images": r["num_images"], "num_samples": r["num_samples"],
                          "skipped_images": r["images"]["skipped"], "skipped_texts": r["texts"]["skipped"]}
                      for s, r in reports.items()}))
    return reports


if __name__ == "__main__":
    sys.exit(run_cli(main))
