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
whose images are all missing are skipped and listed in the report, never a crash. A run locks the
splits it writes and swaps them in whole at its end; it never overwrites a file it did not write
(``solution.prepare_output``).

Speed (a MUGE TSV): the TSV is memory-mapped; worker processes get ``(offset, length)`` of 1 MiB
blocks of lines, read them from the page cache and check every image (``--check``, see
``solution.images``); of a plain line (a JPEG kept as it is) only its id and where its base64
lies travel back, the other lines (an image to convert or skip, a bad id, ...) come back whole.
One worker first reads the texts and writes the pairs LMDB, as if every image survives (they are
written again in the rare case one did not). This process only stores the images: a clean block
goes from the mapping into LMDB in one C-level ``putmulti`` (no decode, no copy through a pipe,
no per-commit fsync; the pages go to disk from a background thread). That is the same work
cn_clip's builder does, so on 2 cores a clean TSV prepares about as fast as with it or faster
(1.00-1.16x in ``scripts/bench_prepare.py``); converting PNG/GIF costs extra CPU that it skips.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from array import array
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from solution.common import SolutionError, atomic_path, check_output, run_cli
from .images import CHECKS, DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, REASONS
from .workers import (check_tsv_block, check_tsv_task, clean_files, cleaning, default_workers, mapped,
                              tsv_blocks)
from .lmdb_io import write_images, write_pairs
from .inputs import SplitInput, Text, load_muge_texts, read_muge, read_table, split_off_valid
from .output import building, check_split_name, muge_output, write_report

log = logging.getLogger(__name__)

SKIP_REASONS = {**REASONS, "missing_file": "the image file does not exist or cannot be read",
                "malformed_line": "the line is not image_id<TAB>base64", "bad_id": "the image id is not an integer",
                "duplicate_id": "an image with this id was already stored (the first one wins)"}
LIST_CONVERTED = 1000  # list at most this many converted images by id in a report
MIN_PARALLEL = 256  # fewer images than this are cleaned in-process (starting a pool costs more)
MIN_PARALLEL_BYTES = 1 << 20  # the same for a TSV smaller than this
TSV_AHEAD = 32  # blocks per worker checked ahead of the LMDB writer (the texts are read meanwhile)


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
            if reason == "duplicate_id":
                self.duplicates.append(entry)
            else:
                self.skipped.append(entry)
                self.by_reason[reason] += 1
            return
        self.kept_ids.add(image_id)
        self.counts[status] += 1
        if status == "converted":
            self.by_action.update(actions)
            if len(self.converted) < LIST_CONVERTED:
                self.converted.append({"image_id": image_id, "format": fmt, "actions": actions})

    def pairs(self, skipped_texts: list[dict], partial: list[dict], *,
              optimistic: bool = False) -> Iterator[tuple[int, int, str]]:
        """The pairs of the texts with their kept images (``optimistic``: as if every image were kept,
        to be written before the images are known; check :meth:`referenced` against the kept ones)."""
        kept = self.kept_ids
        all_kept = (lambda ids: True) if optimistic else kept.issuperset
        unlabelled = texts_kept = dropped = 0
        for t in self.texts:
            ids = t.image_ids
            if ids is None:
                unlabelled += 1
                continue
            if all_kept(ids):  # the common case
                texts_kept += 1
                for image_id in ids:
                    yield image_id, t.text_id, t.text
                continue
            present = [i for i in ids if i in kept]
            missing = [i for i in ids if i not in kept]
            if not present:
                skipped_texts.append({"text_id": t.text_id, "reason": "no_images",
                                      "detail": f"none of its images survived: {missing}"})
                continue
            partial.append({"text_id": t.text_id, "missing_image_ids": missing})
            dropped += len(missing)
            texts_kept += 1
            for image_id in present:
                yield image_id, t.text_id, t.text
        c = self.counts  # set, not added: a second pass replaces an optimistic one
        c["texts_total"], c["texts_unlabelled"], c["texts_kept"], c["pairs_dropped"] = (
            len(self.texts), unlabelled, texts_kept, dropped)

    def referenced(self) -> Iterator[int]:
        """Every image id the texts refer to."""
        return chain.from_iterable(t.image_ids or () for t in self.texts)


def _texts_task(texts_path: str, split_dir: str) -> tuple[int, dict, list[dict], array]:
    """Worker side of a MUGE split's texts: read them and write the pairs LMDB as if every image
    survives; back come the pair count, the ledger's text counts, the problems, and every image id
    the texts refer to (the parent checks those against the images it kept)."""
    split = load_muge_texts(SplitInput("", None, texts_path=Path(texts_path)))
    led = _Ledger("", split.texts)
    n = write_pairs(split_dir, led.pairs([], [], optimistic=True))
    return n, dict(led.counts), split.problems, array("q", led.referenced())


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
        "texts": {"total": c["texts_total"] + len(problems), "kept": c["texts_kept"],
                  "unlabelled": c["texts_unlabelled"], "skipped": len(skipped_texts) + len(problems),
                  "with_missing_images": len(partial)},
        "pairs": {"written": num_samples, "dropped_missing_image": c["pairs_dropped"]},
        "reasons": {k: SKIP_REASONS.get(k, k) for k in sorted(ledger.by_reason) + ["duplicate_id"] * bool(ledger.duplicates)},
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


def _process(split: SplitInput, outputs: list[tuple[str, list[Text] | None]], lmdb_dir: Path, tmps: dict[str, Path],
             muge_dir: Path | None, opts: dict, workers: int, progress: bool, source: str) -> dict[str, dict]:
    """Clean ``split``'s images once and write one LMDB per output (name, texts) into ``tmps[name]`` (its
    temp folder, swapped into ``lmdb_dir`` by the caller), routing images by text.

    Texts None: the split's own (format 1), read while the workers check the images: by one of the
    workers, which also writes the pairs, when there is one output and no MUGE file to write."""
    t0 = time.perf_counter()
    first_where: dict[int, int | str] = {}  # image id -> where it was stored from (a TSV line number, or a path)
    plain = len(outputs) == 1 and not muge_dir  # no routing, no files to write: the fast path applies
    with contextlib.ExitStack() as stack:
        dirs = [tmps[name] for name, _ in outputs]
        side = texts_done = None
        if split.tsv is not None:  # the workers start first
            size = split.tsv.stat().st_size
            path = str(split.tsv)
            n_workers = workers if size >= MIN_PARALLEL_BYTES else 1
            if plain and split.texts is None and n_workers > 1:
                side = (_texts_task, (str(split.texts_path), str(dirs[0])))
            mm = stack.enter_context(mapped(split.tsv)) if size else b""
            cleaned, texts_done = stack.enter_context(cleaning(
                check_tsv_task, tsv_blocks(mm), n_workers, opts,
                task=lambda b: (path, b[0], b[1]), local=lambda b: check_tsv_block(mm[b[0]:b[0] + b[1]], b[0]),
                ahead=TSV_AHEAD, side=side))
        else:
            files = split.files
            batches = (files[i:i + 32] for i in range(0, len(files), 32))
            cleaned, _ = stack.enter_context(cleaning(
                clean_files, batches, workers if len(files) >= MIN_PARALLEL else 1, opts))
        if split.texts is None and side is None:
            load_muge_texts(split)
        ledgers = [_Ledger(name, split.texts if texts is None else texts) for name, texts in outputs]
        owner: dict[int, int] = {}  # image id -> index of the output that gets it (others: the first output)
        for k, led in enumerate(ledgers[1:], 1):
            for t in led.texts:
                for i in t.image_ids or ():
                    owner[i] = k
        shared = {i for t in ledgers[0].texts or () for i in (t.image_ids or ()) if i in owner}

        spools = [stack.enter_context(open(d / "spool.tsv", "wb")) for d in dirs[1:]]
        # the MUGE files (formats 2/3) replace the previous ones only when every output of the split is done
        muge = [stack.enter_context(atomic_path(muge_dir / f"{led.name}_{kind}")) for led in ledgers
                for kind in ("imgs.tsv", "texts.jsonl")] if muge_dir else []
        muge_f = [stack.enter_context(open(p, "wb")) for p in muge[::2]]
        bar = stack.enter_context(_progress(progress, split, size if split.tsv is not None else None))

        def one(where, image_id, status, reason, detail, actions, fmt, data) -> Iterator[tuple[int, bytes]]:
            """Account for one image, route it, and yield it when it goes into the first output."""
            if isinstance(where, int):
                where = f"line {where}"
            targets = [owner.get(image_id, 0)] + ([0] if image_id in shared else [])
            if status != "skipped" and image_id in first_where:
                status, reason = "skipped", "duplicate_id"
                first = first_where[image_id]
                detail = f"image id already stored from {f'line {first}' if isinstance(first, int) else first}; " \
                         "the first one wins"
            for k in targets:
                ledgers[k].image(where, image_id, status, reason, detail, actions, fmt)
            if status == "skipped":
                return
            first_where[image_id] = where
            for k in targets:
                line = b"%d\t%s\n" % (image_id, data)
                if muge_f:
                    muge_f[k].write(line)
                if k:
                    spools[k - 1].write(line)
            if 0 in targets:
                yield image_id, data

        def first_images() -> Iterator[Iterable[tuple[int | bytes, bytes]]]:
            """The first output's images, in chunks: a clean TSV block is one C-level iterator."""
            if split.tsv is None:
                for batch, results in cleaned:
                    yield [row for r in results for row in one(*r)]
                    bar.update(len(batch))
                return
            led = ledgers[0]
            view = memoryview(mm)
            lineno0 = 1
            try:
                for (_, length), blk in cleaned:
                    special, n = blk.special, len(blk.ids)
                    clash = True
                    if plain and n:  # are the plain lines' ids new and distinct? (then their order is moot)
                        new = dict(zip(blk.ids, map(lineno0.__add__, blk.js)))
                        clash = (len(new) < n or not first_where.keys().isdisjoint(new)
                                 or any(r is not None and r[2] != "skipped" and r[1] in new for r in special.values()))
                    if not clash:  # the common case: stored straight from the mapped file, no Python per line
                        first_where.update(new)
                        led.kept_ids.update(blk.ids)
                        led.counts.update(images_total=n, kept=n)
                        led.formats["JPEG"] += n
                        yield zip(map(b"%d".__mod__, blk.ids), map(view.__getitem__, map(slice, blk.starts, blk.stops)))
                        for j in sorted(special):
                            if special[j] is not None:
                                yield list(one(lineno0 + j, *special[j][1:]))
                    else:  # line by line, in file order (routing, MUGE files to write, or a repeated id)
                        at = dict(zip(blk.js, zip(blk.ids, blk.starts, blk.stops)))
                        for j in sorted(chain(at, special)):
                            if j in at:
                                i, start, stop = at[j]
                                yield list(one(lineno0 + j, i, "kept", None, "", [], "JPEG", mm[start:stop]))
                            elif special[j] is not None:
                                yield list(one(lineno0 + j, *special[j][1:]))
                    lineno0 += blk.lines
                    bar.update(length)
                    if texts_done is not None and texts_done.ready() and not texts_done.successful():
                        texts_done.get()  # the texts are unusable: say so now, not after every image
            finally:
                view.release()

        def spooled(path: Path) -> Iterator[tuple[int, bytes]]:
            with open(path, "rb") as f:
                for line in f:
                    i, d = line.rstrip(b"\n").split(b"\t")
                    yield int(i), d

        reports = {}
        for k, (led, d) in enumerate(zip(ledgers, dirs)):
            skipped_texts, partial = [], []
            if k == 0:
                # the pairs are written first (by a worker, or here while the workers check), as if every
                # image survives; in the rare case one did not, they are written again
                if side is None:
                    n_pairs = write_pairs(d, led.pairs(skipped_texts, partial, optimistic=True))
                    n_img = write_images(d, chain.from_iterable(first_images()))
                    optimistic_held = led.kept_ids.issuperset(led.referenced())
                else:
                    n_img = write_images(d, chain.from_iterable(first_images()))
                    n_pairs, counts, problems, referenced = texts_done.get()
                    optimistic_held = led.kept_ids.issuperset(referenced)
                    if optimistic_held:
                        led.counts.update(counts)
                        split.problems.extend(problems)
                    else:
                        led.texts = load_muge_texts(split).texts
                if not optimistic_held:
                    n_pairs = write_pairs(d, led.pairs(skipped_texts, partial))
            else:
                spools[k - 1].close()
                n_img = write_images(d, spooled(d / "spool.tsv"))
                n_pairs = write_pairs(d, led.pairs(skipped_texts, partial))
            (d / "spool.tsv").unlink(missing_ok=True)
            if muge_dir:
                kept = [{"text_id": t.text_id, "text": t.text, "image_ids": [i for i in t.image_ids if i in led.kept_ids]}
                        for t in led.texts if t.image_ids and any(i in led.kept_ids for i in t.image_ids)]
                muge[2 * k + 1].write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in kept),
                                           encoding="utf-8")
            rep = _report(led, split if k == 0 else None, skipped_texts, partial, n_img, n_pairs,
                          time.perf_counter() - t0, source if k == 0 else f"{source}, --make-valid from {split.name}",
                          lmdb_dir / led.name)
            write_report(d / "report.json", rep)
            reports[led.name] = rep
        if len(outputs) > 1 and not all(r["num_samples"] for r in reports.values()):
            empty = next(n for n, r in reports.items() if not r["num_samples"])
            raise SolutionError(f"--make-valid would leave split {empty!r} without a single pair (the images of its "
                                f"queries were all skipped): nothing written; give a larger fraction or clean the data")
        bar.close()
    for rep in reports.values():
        log.info("%s", _summary_line(rep))
    return reports


def _progress(enabled: bool, split: SplitInput, tsv_bytes: int | None):
    """The cleaning progress bar (bytes of a TSV, or files); tqdm is imported only when it shows."""
    if not enabled:
        return contextlib.nullcontext(_NoBar())
    from tqdm import tqdm

    if tsv_bytes is not None:
        return tqdm(total=tsv_bytes, desc=f"cleaning {split.name}", unit="B", unit_scale=True, mininterval=1.0)
    return tqdm(total=len(split.files), desc=f"cleaning {split.name}", unit="img", mininterval=1.0)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- API + CLI


def prepare(data_dir, splits: Sequence[str] | str = ("train", "valid", "test"), *, lmdb_dir=None,
            max_side: int | None = None, quality: int = DEFAULT_QUALITY, max_pixels: int | None = DEFAULT_MAX_PIXELS,
            workers: int | None = None, make_valid: float | None = None, valid_name: str = "valid",
            csv: str | os.PathLike | None = None, images_dir=None, captions=None, seed: int = 0,
            check: str = CHECKS[0], progress: bool = True) -> dict[str, dict]:
    """Build ``LMDB_DIR/{split}`` for each split; returns {split: report} (also in each report.json)."""
    data_dir = Path(data_dir)
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",")]
    splits = [check_split_name(s) for s in dict.fromkeys(s for s in splits if s)]
    if not splits:
        raise SolutionError("no split given (e.g. --splits train,valid,test)")
    if make_valid and check_split_name(valid_name) == splits[0]:
        raise SolutionError(f"--valid-name {valid_name!r} is the split --make-valid splits off from; choose another")
    if max_side is not None and max_side < 8:
        raise SolutionError(f"--max-side {max_side} is too small (at least 8)")
    if not 1 <= quality <= 100:
        raise SolutionError(f"--quality must lie in 1..100, got {quality}")
    if check not in CHECKS:
        raise SolutionError(f"--check must be one of {', '.join(CHECKS)}, got {check!r}")
    if captions and not images_dir and not csv:
        raise SolutionError("--captions needs --images-dir (the folder the image paths are relative to)")
    if images_dir and not (captions or csv):
        raise SolutionError("--images-dir needs --captions FILE (or --csv FILE)")
    if csv or captions:
        source = "csv" if csv else "folder"
        base = Path(images_dir) if images_dir else None
        if base is not None and not base.is_dir():
            raise SolutionError(f"--images-dir {base} is not a directory")
        check_output(data_dir, is_dir=True, what="--data-dir")
        inputs = read_table(str(csv or captions), splits, base)
        muge_dir = data_dir
    else:
        if not data_dir.is_dir():
            raise SolutionError(f"--data-dir {data_dir} is not a directory")
        source, muge_dir = "muge", None
        wanted = [s for s in splits if not (make_valid and s == valid_name)]
        inputs = {s: read_muge(data_dir, s, texts=False) for s in wanted}  # texts: read while workers start
    lmdb_dir = check_output(lmdb_dir or data_dir / "lmdb", is_dir=True, what="--lmdb-dir")

    plan: list[tuple[SplitInput, list[tuple[str, list[Text]]]]] = []
    for name in splits:
        if make_valid and name == valid_name:
            continue
        if name not in inputs:
            raise SolutionError(f"no rows for split {name!r} in {csv or captions} (splits found: {', '.join(inputs)})")
        split = inputs[name]
        outputs: list[tuple[str, list[Text] | None]] = [(name, None)]  # None: the split's own texts
        if make_valid and name == splits[0]:
            if valid_name in inputs and inputs[valid_name].texts:
                raise SolutionError(f"the input already has a {valid_name!r} split; drop --make-valid")
            if split.texts is None:
                load_muge_texts(split)
            train_t, valid_t = split_off_valid(split.texts, make_valid, seed, where=split.texts_path or csv or captions)
            outputs = [(name, train_t), (valid_name, valid_t)]
        plan.append((split, outputs))

    opts = {"max_side": max_side, "quality": quality, "max_pixels": max_pixels, "check": check}
    workers = default_workers() if workers is None else max(0, int(workers))
    reports: dict[str, dict] = {}
    names = [name for _, outputs in plan for name, _ in outputs]
    tables = {Path(str(csv or captions).replace("{split}", s)) for s in splits} if muge_dir else ()
    with contextlib.ExitStack() as stack:  # every check first: a refusal leaves nothing written
        record = stack.enter_context(muge_output(muge_dir, names, tables)) if muge_dir else None
        tmps = stack.enter_context(building(lmdb_dir, names))
        for split, outputs in plan:
            reports.update(_process(split, outputs, lmdb_dir, tmps, muge_dir, opts, workers, progress, source))
            if record:
                record([name for name, _ in outputs])
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
    p.add_argument("--check", choices=CHECKS, default=CHECKS[0],
                   help="how a JPEG is checked before it is kept byte for byte. structural (default): its marker "
                        "structure only, no pixel decoded (header, plain RGB frame, no EXIF rotation, a scan, the "
                        "end marker): about as fast as cn_clip's builder, but damage inside the compressed data of "
                        "an otherwise intact file goes unnoticed (solution.data decodes defensively: such an image "
                        "trains with artefacts or is dropped, never a crash). full: decode every image as well; "
                        "catches that too, several times slower")
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
                      check=a.check, progress=not a.no_progress)
    print(json.dumps({s: {"num_images": r["num_images"], "num_samples": r["num_samples"],
                          "skipped_images": r["images"]["skipped"], "skipped_texts": r["texts"]["skipped"]}
                      for s, r in reports.items()}))
    return reports


if __name__ == "__main__":
    sys.exit(run_cli(main))
