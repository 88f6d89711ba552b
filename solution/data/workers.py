"""What runs in ``solution.prepare``'s cleaning processes, and the pool that feeds them.

A MUGE TSV is memory-mapped and cut into blocks of whole lines (:func:`tsv_blocks`); a worker
reads its block by offset and checks every line (:func:`check_tsv_block`); files of formats 2/3
are cleaned in batches (:func:`clean_files`); one worker may first read a MUGE split's texts and
write its pairs (:func:`texts_task`). :func:`cleaning` runs either on a process pool (or
in-process for small inputs) and hands the results back in input order.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import mmap
import multiprocessing as mp
import os
import threading
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import NamedTuple

from .images import CHECKS, clean_b64, clean_image
from .inputs import SplitInput, load_muge_texts
from .jpeg import B64_ALPHABET, DEFAULT_MAX_PIXELS, jpeg_b64_span
from .ledger import Ledger
from .lmdb_io import write_pairs

TSV_BLOCK = 1 << 20  # bytes of whole TSV lines per worker task

_OPTS: dict = {}
_FDS: dict[str, int] = {}


def init_worker(opts: dict) -> None:
    _OPTS.clear()
    _OPTS.update(opts)


def clean_tsv_line(lineno: int, line: bytes, opts: dict | None = None) -> tuple:
    """One TSV line -> (line number, image_id, status, reason, detail, actions, format, base64 or None);
    ``opts`` (default: the worker's) are :func:`~.images.clean_b64`'s keywords."""
    try:
        parts = line.rstrip(b"\r").split(b"\t")
        if len(parts) != 2:
            return (
                lineno,
                None,
                "skipped",
                "malformed_line",
                f"expected 2 tab-separated fields, found {len(parts)}",
                [],
                None,
                None,
            )
        try:
            image_id = int(parts[0])
        except ValueError:
            return (lineno, None, "skipped", "bad_id", f"image id {parts[0][:40]!r} is not an integer", [], None, None)
        r = clean_b64(parts[1], **(_OPTS if opts is None else opts))
        return (lineno, image_id, r.status, r.reason, r.detail, r.actions, r.format, r.data)
    except Exception as e:  # noqa: BLE001 - never let one line kill the pool
        return (lineno, None, "skipped", "corrupt", f"{type(e).__name__}: {e}", [], None, None)


# What a plain line leaves outside the base64 alphabet -> (padding, a CR before the LF)
_PLAIN_LEFT = {b"\t": (0, 0), b"\t=": (1, 0), b"\t==": (2, 0), b"\t\r": (0, 1), b"\t=\r": (1, 1), b"\t==\r": (2, 1)}


class Block(NamedTuple):
    """What a worker says about one block of TSV lines (see :func:`check_tsv_block`)."""

    lines: int  # lines in the block
    special: dict[int, tuple | None]  # line j (from 0) -> clean_tsv_line's tuple, or None when blank
    ids: array  # the plain lines: image id,
    starts: array  # where its base64 starts and stops in the file (CR excluded),
    stops: array
    js: array  # and its line j


def check_tsv_block(block: bytes, offset: int = 0, opts: dict | None = None) -> Block:
    """Check a block of whole TSV lines that starts at byte ``offset`` of the file (``opts``: the
    cleaning options, default the worker's).

    A plain line is ``digits<TAB>base64[CR]`` (a canonical decimal id, one tab, strict base64) whose
    image is kept exactly as it is: only its id and where its base64 lies in the file travel back,
    and the parent stores it straight from its own view of the file (no copy through the pipe).
    Every other line ``j`` (counted in the block, from 0) is *special*: it maps to the tuple of
    :func:`clean_tsv_line` (with ``j`` as its line number), or to None when blank.

    With ``check="structural"`` the base64 alphabet of the whole block is checked in one C pass and
    each line costs a header walk (:func:`solution.data.jpeg.jpeg_b64_span`); nothing is decoded but
    the JPEG headers and tails.
    """
    opts = _OPTS if opts is None else opts
    structural = opts.get("check", CHECKS[0]) == "structural"
    max_side, max_pixels = opts.get("max_side"), opts.get("max_pixels", DEFAULT_MAX_PIXELS)
    special: dict[int, tuple | None] = {}
    ids, starts, stops, js = array("q"), array("q"), array("q"), array("q")
    lefts = block.translate(None, B64_ALPHABET).split(b"\n") if structural else None
    s, end, j = 0, len(block), 0
    while s < end:
        e = block.find(b"\n", s)
        if e < 0:
            e = end
        t = block.find(b"\t", s, e)
        if t > s and block[s:t].isdigit() and (block[s] != 0x30 or t == s + 1):
            if structural:
                plain = _PLAIN_LEFT.get(lefts[j])
                if plain is not None:
                    info = jpeg_b64_span(block, t + 1, e - plain[1], plain[0])
                    if info is not None and info.keepable(max_side, max_pixels):
                        ids.append(int(block[s:t]))
                        starts.append(offset + t + 1)
                        stops.append(offset + e - plain[1])
                        js.append(j)
                        s, j = e + 1, j + 1
                        continue
            else:
                stop = e - 1 if e > t + 1 and block[e - 1] == 13 else e  # CR LF
                b64 = block[t + 1 : stop]
                try:
                    r = clean_b64(b64, **opts)
                    if r.status == "kept" and r.data is b64:
                        ids.append(int(block[s:t]))
                        starts.append(offset + t + 1)
                        stops.append(offset + stop)
                        js.append(j)
                    else:
                        special[j] = (j, int(block[s:t]), r.status, r.reason, r.detail, r.actions, r.format, r.data)
                except Exception as ex:  # noqa: BLE001 - never let one line kill the pool
                    special[j] = (
                        j,
                        int(block[s:t]),
                        "skipped",
                        "corrupt",
                        f"{type(ex).__name__}: {ex}",
                        [],
                        None,
                        None,
                    )
                s, j = e + 1, j + 1
                continue
        line = block[s:e]
        special[j] = clean_tsv_line(j, line, opts) if line.strip() else None
        s, j = e + 1, j + 1
    return Block(j, special, ids, starts, stops, js)


def check_tsv_task(task: tuple[str, int, int]) -> Block:
    """Worker side of :func:`check_tsv_block`: it reads the block itself, by offset (from the page
    cache), so only ``(path, offset, length)`` goes down the pipe."""
    path, offset, length = task
    fd = _FDS.get(path)
    if fd is None:
        fd = _FDS[path] = os.open(path, os.O_RDONLY)
    block = os.pread(fd, length, offset)
    if len(block) != length:
        raise OSError(f"{path} changed while it was being read")
    return check_tsv_block(block, offset)


def clean_file(item: tuple[int, str]) -> tuple:
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


def clean_files(batch: list[tuple[int, str]]) -> list[tuple]:
    return [clean_file(item) for item in batch]


def texts_task(texts_path: str, split_dir: str) -> tuple[int, dict, list[dict], array]:
    """Worker side of a MUGE split's texts: read them and write the pairs LMDB as if every image
    survives; back come the pair count, the ledger's text counts, the problems, and every image id
    the texts refer to (the parent checks those against the images it kept)."""
    split = load_muge_texts(SplitInput("", None, texts_path=Path(texts_path)))
    led = Ledger("", split.texts)
    n = write_pairs(split_dir, led.pairs([], [], optimistic=True), exact=True)
    return n, dict(led.counts), split.problems, array("q", led.referenced())


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def cleaning(
    func,
    items: Iterable,
    workers: int,
    opts: dict,
    task=None,
    local=None,
    ahead: int = 4,
    side=None,
    first: tuple | None = None,
):
    """Yield ``(results, side_result)``: ``results`` iterates ``(item, func(task(item)))`` in input order,
    computed on ``workers`` processes (``local(item)`` in this process when ``workers <= 1``), after
    ``first``, an ``(item, result)`` the caller computed already;
    ``side = (fn, args)`` is one more task handed to the workers first, ``side_result`` its
    ``AsyncResult`` (None in-process: the caller runs it itself).

    The workers start on entry, so the caller can do other work before it asks for the first
    result. Items are consumed lazily, at most ``ahead`` per worker before their results are
    taken, so a huge TSV never sits in memory, and the caller works on finished results (LMDB
    puts) while the workers check the next ones.
    """
    if workers <= 1:
        init_worker(opts)
        yield chain([first] if first else [], ((b, (local or func)(b)) for b in items)), None
        return
    window, stop = threading.Semaphore(workers * ahead), threading.Event()
    pending: deque = deque()

    def throttled():
        for b in items:
            window.acquire()
            if stop.is_set():  # the caller has left (an error): let the pool's thread end
                return
            pending.append(b)
            yield task(b) if task else b

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    freeze = gc.get_freeze_count() == 0  # (a caller that froze objects itself is left as it is)
    if freeze:
        gc.freeze()  # the forked workers' collections skip what they inherit (no copy-on-write of its pages)
    try:
        pool = ctx.Pool(workers, initializer=init_worker, initargs=(opts,))
    finally:
        if freeze:
            gc.unfreeze()  # this process: as before
    with pool:
        side_result = pool.apply_async(*side) if side else None
        started = pool.imap(func, throttled(), 1)  # a pool thread starts handing out tasks now

        def results():
            if first:
                yield first
            for r in started:
                window.release()
                yield pending.popleft(), r

        try:
            yield results(), side_result
        finally:
            stop.set()
            window.release()  # wake the pool's thread if it waits for room, or the pool never closes


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[mmap.mmap]:
    """The file, memory-mapped read-only (the page cache, shared with the workers, no copy)."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_SEQUENTIAL"):
        mm.madvise(mmap.MADV_SEQUENTIAL)
    try:
        yield mm
    finally:
        try:
            mm.close()
        except BufferError:  # a view still alive (e.g. in a traceback): the mapping goes with it
            pass


def tsv_blocks(mm, size: int | None = None) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of blocks of about ``size`` (default :data:`TSV_BLOCK`) bytes of whole
    lines of a mapped TSV."""
    size = size or TSV_BLOCK
    n = len(mm)
    offset = 3 if mm[:3] == b"\xef\xbb\xbf" else 0  # a UTF-8 byte order mark
    while offset < n:
        stop = offset + size
        if stop < n:
            cut = mm.find(b"\n", stop)
            stop = n if cut < 0 else cut + 1
        else:
            stop = n
        yield offset, stop - offset
        offset = stop
