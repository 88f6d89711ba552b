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
Images are cleaned in parallel (:mod:`solution.data.images`); bad images, duplicate ids and texts
whose images are all missing are skipped and listed in the report, never a crash. A run locks the
splits it writes and swaps them in whole at its end; it never overwrites a file it did not write
(:mod:`solution.data.output`).

Speed (a MUGE TSV): the TSV is memory-mapped; worker processes get ``(offset, length)`` of 1 MiB
blocks of lines, read them from the page cache and check every image (``--check``, see
:mod:`solution.data.images`); of a plain line (a JPEG kept as it is) only its id and where its base64
lies travel back, the other lines (an image to convert or skip, a bad id, ...) come back whole.
One worker first reads the texts and writes the pairs LMDB, as if every image survives (they are
written again in the rare case one did not). This process only stores the images: a clean block
goes from the mapping into LMDB in one C-level ``putmulti`` (no decode, no copy through a pipe,
no per-commit fsync; the pages go to disk from a background thread). That is the same work
cn_clip's builder does, so on 2 cores a clean TSV prepares about as fast as with it or faster
(1.1-1.2x in ``scripts/bench_prepare.py``). Converting PNG/GIF (about 1-2 ms of CPU each, decode and
re-encode) is work cn_clip's builder skips: PIL is imported once, by this process (it checks the first
block itself before the workers fork, and imports PIL only when that block needs it), the workers'
garbage collector skips what they inherit, and tqdm is imported only for a bar on a terminal. On a busy
machine, where every CPU-second counts, a TSV with conversions can still take longer than cn_clip's copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path

from solution.common import SolutionError, atomic_path, check_output

from .images import CHECKS, DEFAULT_MAX_PIXELS, DEFAULT_QUALITY
from .inputs import SplitInput, Text, load_muge_texts, read_muge, read_table, split_off_valid
from .ledger import Ledger, split_report, summary_line
from .lmdb_io import write_images, write_pairs
from .output import building, check_split_name, muge_output, write_report
from .workers import (
    check_tsv_block,
    check_tsv_task,
    clean_files,
    cleaning,
    default_workers,
    mapped,
    texts_task,
    tsv_blocks,
)

log = logging.getLogger(__name__)

MIN_PARALLEL = 256  # fewer images than this are cleaned in-process (starting a pool costs more)
MIN_PARALLEL_BYTES = 1 << 20  # the same for a TSV smaller than this
TSV_AHEAD = 32  # blocks per worker checked ahead of the LMDB writer (the texts are read meanwhile)

Outputs = list[tuple[str, list[Text] | None]]  # (output split name, its texts; None: the input split's own)


# ---------------------------------------------------------------- one split


class _SplitRun:
    """One input split's images cleaned once into one LMDB per output, each in its temp folder ``dirs[k]``,
    images routed by text (an image goes to the output whose texts name it, else to the first).

    Texts None: the split's own (format 1), read while the workers check the images: by one of the
    workers, which also writes the pairs, when there is one output and no MUGE file to write."""

    def __init__(self, split: SplitInput, outputs: Outputs, dirs: list[Path], muge_dir: Path | None):
        self.split, self.outputs, self.dirs, self.muge_dir = split, outputs, dirs, muge_dir
        self.plain = len(outputs) == 1 and not muge_dir  # no routing, no files to write: the fast path applies
        self.first_where: dict[int, int | str] = {}  # image id -> where it was stored from (a TSV line, or a path)
        self.side = self.texts_done = self.size = None
        self.mm = b""

    def start(self, stack: contextlib.ExitStack, opts: dict, workers: int) -> None:
        """Start the cleaning (on ``workers`` processes unless the input is small)."""
        split = self.split
        if split.tsv is None:
            files = split.files
            batches = (files[i : i + 32] for i in range(0, len(files), 32))
            self.cleaned, _ = stack.enter_context(
                cleaning(clean_files, batches, workers if len(files) >= MIN_PARALLEL else 1, opts)
            )
            return
        self.size = size = split.tsv.stat().st_size
        path = str(split.tsv)
        n_workers = workers if size >= MIN_PARALLEL_BYTES else 1
        if self.plain and split.texts is None and n_workers > 1:
            self.side = (texts_task, (str(split.texts_path), str(self.dirs[0])))
        mm = self.mm = stack.enter_context(mapped(split.tsv)) if size else b""
        blocks, first = tsv_blocks(mm), None
        if n_workers > 1:  # the first block is checked here, before the workers fork: when it holds an image to
            b = next(blocks, None)  # convert, PIL is imported once, here, for all of them (not once in each)
            first = (b, check_tsv_block(mm[b[0] : b[0] + b[1]], b[0], opts)) if b else None
        self.cleaned, self.texts_done = stack.enter_context(
            cleaning(
                check_tsv_task,
                blocks,
                n_workers,
                opts,
                task=lambda b: (path, b[0], b[1]),
                local=lambda b: check_tsv_block(mm[b[0] : b[0] + b[1]], b[0]),
                ahead=TSV_AHEAD,
                side=self.side,
                first=first,
            )
        )

    def route(self, stack: contextlib.ExitStack, progress: bool) -> None:
        """The texts (unless a worker reads them), one ledger per output, where each image goes; the spools
        of the other outputs, the MUGE files and the progress bar opened."""
        split = self.split
        if split.texts is None and self.side is None:
            load_muge_texts(split)
        self.ledgers = [Ledger(name, split.texts if texts is None else texts) for name, texts in self.outputs]
        self.owner: dict[int, int] = {}  # image id -> index of the output that gets it (others: the first output)
        for k, led in enumerate(self.ledgers[1:], 1):
            for t in led.texts:
                for i in t.image_ids or ():
                    self.owner[i] = k
        self.shared = {i for t in self.ledgers[0].texts or () for i in (t.image_ids or ()) if i in self.owner}
        self.spools = [stack.enter_context(open(d / "spool.tsv", "wb")) for d in self.dirs[1:]]
        # the MUGE files (formats 2/3) replace the previous ones only when every output of the split is done
        muge_dir = self.muge_dir
        self.muge = (
            [
                stack.enter_context(atomic_path(muge_dir / f"{led.name}_{kind}"))
                for led in self.ledgers
                for kind in ("imgs.tsv", "texts.jsonl")
            ]
            if muge_dir
            else []
        )
        self.muge_f = [stack.enter_context(open(p, "wb")) for p in self.muge[::2]]
        self.bar = stack.enter_context(_progress(progress, split, self.size))

    def one(self, where, image_id, status, reason, detail, actions, fmt, data) -> Iterator[tuple[bytes, bytes]]:
        """Account for one image, route it, and yield it when it goes into the first output."""
        if isinstance(where, int):
            where = f"line {where}"
        targets = [self.owner.get(image_id, 0)] + ([0] if image_id in self.shared else [])
        first_where = self.first_where
        if status != "skipped" and image_id in first_where:
            status, reason = "skipped", "duplicate_id"
            first = first_where[image_id]
            detail = (
                f"image id already stored from {f'line {first}' if isinstance(first, int) else first}; "
                "the first one wins"
            )
        for k in targets:
            self.ledgers[k].image(where, image_id, status, reason, detail, actions, fmt)
        if status == "skipped":
            return
        first_where[image_id] = where
        for k in targets:
            line = b"%d\t%s\n" % (image_id, data)
            if self.muge_f:
                self.muge_f[k].write(line)
            if k:
                self.spools[k - 1].write(line)
        if 0 in targets:
            yield b"%d" % image_id, data

    def first_images(self) -> Iterator[Iterable[tuple[bytes, bytes]]]:
        """The first output's images, in chunks: a clean TSV block is one C-level iterator."""
        if self.split.tsv is None:
            for batch, results in self.cleaned:
                yield [row for r in results for row in self.one(*r)]
                self.bar.update(len(batch))
            return
        view = memoryview(self.mm)
        lineno0 = 1
        try:
            for (_, length), blk in self.cleaned:
                yield from self._block(blk, lineno0, view)
                lineno0 += blk.lines
                self.bar.update(length)
                done = self.texts_done
                if done is not None and done.ready() and not done.successful():
                    done.get()  # the texts are unusable: say so now, not after every image
        finally:
            view.release()

    def _block(self, blk, lineno0: int, view: memoryview) -> Iterator[Iterable[tuple[bytes, bytes]]]:
        """One checked TSV block's images (its first line is line ``lineno0`` of the file)."""
        special, n = blk.special, len(blk.ids)
        first_where = self.first_where
        clash = True
        if self.plain and n:  # are the plain lines' ids new and distinct? (then their order is moot)
            new = dict(zip(blk.ids, map(lineno0.__add__, blk.js)))
            clash = (
                len(new) < n
                or not first_where.keys().isdisjoint(new)
                or any(r is not None and r[2] != "skipped" and r[1] in new for r in special.values())
            )
        if not clash:  # the common case: stored straight from the mapped file, no Python per line
            first_where.update(new)
            led = self.ledgers[0]
            led.kept_ids.update(blk.ids)
            led.counts.update(images_total=n, kept=n)
            led.formats["JPEG"] += n
            yield zip(map(b"%d".__mod__, blk.ids), map(view.__getitem__, map(slice, blk.starts, blk.stops)))
            for j in sorted(special):
                if special[j] is not None:
                    yield list(self.one(lineno0 + j, *special[j][1:]))
            return
        # line by line, in file order (routing, MUGE files to write, or a repeated id)
        at = dict(zip(blk.js, zip(blk.ids, blk.starts, blk.stops)))
        mm = self.mm
        for j in sorted(chain(at, special)):
            if j in at:
                i, start, stop = at[j]
                yield list(self.one(lineno0 + j, i, "kept", None, "", [], "JPEG", mm[start:stop]))
            elif special[j] is not None:
                yield list(self.one(lineno0 + j, *special[j][1:]))

    def write(self, k: int, t0: float, lmdb_dir: Path, source: str) -> dict:
        """Write output ``k`` (images, pairs, MUGE texts file, report.json); its report."""
        led, d = self.ledgers[k], self.dirs[k]
        skipped_texts, partial = [], []
        if k == 0:
            n_img, n_pairs = self._write_first(led, d, skipped_texts, partial)
        else:
            self.spools[k - 1].close()
            n_img = write_images(d, _spooled(d / "spool.tsv"), keyed=True)
            n_pairs = write_pairs(d, led.pairs(skipped_texts, partial), exact=True)
        (d / "spool.tsv").unlink(missing_ok=True)
        if self.muge_dir:
            self.muge[2 * k + 1].write_text(
                "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in led.kept_texts()), encoding="utf-8"
            )
        rep = split_report(
            led,
            self.split if k == 0 else None,
            skipped_texts,
            partial,
            n_img,
            n_pairs,
            time.perf_counter() - t0,
            source if k == 0 else f"{source}, --make-valid from {self.split.name}",
            lmdb_dir / led.name,
        )
        write_report(d / "report.json", rep)
        return rep

    def _write_first(self, led: Ledger, d: Path, skipped_texts: list, partial: list) -> tuple[int, int]:
        """The first output's images and pairs. The pairs are written first (by a worker, or here while
        the workers check), as if every image survives; in the rare case one did not, they are written again."""
        if self.side is None:
            n_pairs = write_pairs(d, led.pairs(skipped_texts, partial, optimistic=True), exact=True)
            n_img = write_images(d, chain.from_iterable(self.first_images()), keyed=True)
            held = led.kept_ids.issuperset(led.referenced())
        else:
            n_img = write_images(d, chain.from_iterable(self.first_images()), keyed=True)
            n_pairs, counts, problems, referenced = self.texts_done.get()
            held = led.kept_ids.issuperset(referenced)
            if held:
                led.counts.update(counts)
                self.split.problems.extend(problems)
            else:
                led.texts = load_muge_texts(self.split).texts
        if not held:
            n_pairs = write_pairs(d, led.pairs(skipped_texts, partial), exact=True)
        return n_img, n_pairs


def _spooled(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """The spooled rows, ``(decimal id, base64)`` as :meth:`_SplitRun.one` wrote them."""
    with open(path, "rb") as f:
        for line in f:
            i, d = line.rstrip(b"\n").split(b"\t")
            yield i, d


def _process(
    split: SplitInput,
    outputs: Outputs,
    lmdb_dir: Path,
    tmps: dict[str, Path],
    muge_dir: Path | None,
    opts: dict,
    workers: int,
    progress: bool,
    source: str,
) -> dict[str, dict]:
    """Clean ``split``'s images once and write one LMDB per output (name, texts) into ``tmps[name]`` (its
    temp folder, swapped into ``lmdb_dir`` by the caller); {name: report}."""
    t0 = time.perf_counter()
    run = _SplitRun(split, outputs, [tmps[name] for name, _ in outputs], muge_dir)
    reports = {}
    with contextlib.ExitStack() as stack:
        run.start(stack, opts, workers)  # the workers start first
        run.route(stack, progress)
        for k in range(len(outputs)):
            rep = run.write(k, t0, lmdb_dir, source)
            reports[rep["split"]] = rep
        if len(outputs) > 1 and not all(r["num_samples"] for r in reports.values()):
            empty = next(n for n, r in reports.items() if not r["num_samples"])
            raise SolutionError(
                f"--make-valid would leave split {empty!r} without a single pair (the images of its "
                f"queries were all skipped): nothing written; give a larger fraction or clean the data"
            )
        run.bar.close()
    for rep in reports.values():
        log.info("%s", summary_line(rep))
    return reports


def _progress(enabled: bool, split: SplitInput, tsv_bytes: int | None):
    """The cleaning progress bar (bytes of a TSV, or files) on a terminal; tqdm is imported only when it
    shows (a log file gets the summary line instead: a bar there is noise, and importing tqdm costs
    about 0.1 s)."""
    if not enabled or not sys.stderr.isatty():
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


# ---------------------------------------------------------------- API


def prepare(
    data_dir,
    splits: Sequence[str] | str = ("train", "valid", "test"),
    *,
    lmdb_dir=None,
    max_side: int | None = None,
    quality: int = DEFAULT_QUALITY,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    make_valid: float | None = None,
    valid_name: str = "valid",
    csv: str | os.PathLike | None = None,
    images_dir=None,
    captions=None,
    seed: int = 0,
    check: str = CHECKS[0],
    progress: bool = True,
) -> dict[str, dict]:
    """Build ``LMDB_DIR/{split}`` for each split; returns {split: report} (also in each report.json).

    ``splits``: names, or one comma-separated string. Every argument is checked (one
    :class:`SolutionError` line each) before anything is written."""
    data_dir = Path(data_dir)
    splits = _check_args(
        splits,
        make_valid=make_valid,
        valid_name=valid_name,
        max_side=max_side,
        quality=quality,
        check=check,
        csv=csv,
        images_dir=images_dir,
        captions=captions,
    )
    table = csv or captions
    if table:
        source, muge_dir = "csv" if csv else "folder", data_dir
        base = Path(images_dir) if images_dir else None
        if base is not None and not base.is_dir():
            raise SolutionError(f"--images-dir {base} is not a directory")
        check_output(data_dir, is_dir=True, what="--data-dir")
        inputs = read_table(str(table), splits, base)
    else:
        if not data_dir.is_dir():
            raise SolutionError(f"--data-dir {data_dir} is not a directory")
        source, muge_dir = "muge", None
        wanted = [s for s in splits if not (make_valid and s == valid_name)]
        inputs = {s: read_muge(data_dir, s, texts=False) for s in wanted}  # texts: read while workers start
    lmdb_dir = check_output(lmdb_dir or data_dir / "lmdb", is_dir=True, what="--lmdb-dir")
    plan = _plan(inputs, splits, make_valid, valid_name, seed, table)
    opts = {"max_side": max_side, "quality": quality, "max_pixels": max_pixels, "check": check}
    workers = default_workers() if workers is None else max(0, int(workers))
    reports: dict[str, dict] = {}
    names = [name for _, outputs in plan for name, _ in outputs]
    tables = {Path(str(table).replace("{split}", s)) for s in splits} if muge_dir else ()
    with contextlib.ExitStack() as stack:  # every check first: a refusal leaves nothing written
        record = stack.enter_context(muge_output(muge_dir, names, tables)) if muge_dir else None
        tmps = stack.enter_context(building(lmdb_dir, names))
        for split, outputs in plan:
            reports.update(_process(split, outputs, lmdb_dir, tmps, muge_dir, opts, workers, progress, source))
            if record:
                record([name for name, _ in outputs])
    total = sum(r["images"]["total"] for r in reports.values())
    skipped = sum(r["images"]["skipped"] + r["images"]["duplicates"] for r in reports.values())
    log.info(
        "prepared %s in %s: %d images, %d stored, %d skipped (details in each report.json)",
        ",".join(reports),
        lmdb_dir,
        total,
        sum(r["num_images"] for r in reports.values()),
        skipped,
    )
    return reports


def _check_args(
    splits: Sequence[str] | str, *, make_valid, valid_name, max_side, quality, check, csv, images_dir, captions
) -> list[str]:
    """The split names to build (checked, in order, without repeats); refuse impossible arguments."""
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
    return splits


def _plan(
    inputs: dict[str, SplitInput], splits: list[str], make_valid: float | None, valid_name: str, seed: int, table
) -> list[tuple[SplitInput, Outputs]]:
    """Each input split with its outputs: itself, or (``make_valid``) itself and the validation split cut off it."""
    plan = []
    for name in splits:
        if make_valid and name == valid_name:
            continue
        if name not in inputs:
            raise SolutionError(f"no rows for split {name!r} in {table} (splits found: {', '.join(inputs)})")
        split = inputs[name]
        outputs: Outputs = [(name, None)]  # None: the split's own texts
        if make_valid and name == splits[0]:
            if valid_name in inputs and inputs[valid_name].texts:
                raise SolutionError(f"the input already has a {valid_name!r} split; drop --make-valid")
            if split.texts is None:
                load_muge_texts(split)
            train_t, valid_t = split_off_valid(split.texts, make_valid, seed, where=split.texts_path or table)
            outputs = [(name, train_t), (valid_name, valid_t)]
        plan.append((split, outputs))
    return plan
