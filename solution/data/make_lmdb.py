"""``prepare``: inputs (:mod:`.inputs`) -> images cleaned one by one (:mod:`.images`) + texts -> cn_clip's
LMDB layout, with ``LMDB_DIR/{split}/report.json`` listing what was skipped and why.

Each output split is built in a temp folder under its lock (``LMDB_DIR/.{split}.lock``, an ``flock`` the
kernel drops with its process); all are swapped in together at the end, so a failed, killed or disk-full
run leaves the previous LMDBs as they were. Formats 2/3 also write the MUGE files, only where none is or
over one an earlier prepare wrote and nobody changed since (``DATA_DIR/.prepare_written.json``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from solution.common import SolutionError, atomic_path, check_output, folder_lock, is_disk_full, write_json

from .images import CHECKS, DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, REASONS, Cleaned, clean_b64, clean_image, skip
from .inputs import SplitInput, Text, read_muge, read_table, split_off_valid
from .lmdb_io import Writer, write_pairs

log = logging.getLogger(__name__)

SPLIT_ENTRIES = {"imgs", "pairs", "report.json"}  # what a split folder of prepare (or cn_clip's builder) holds
MANIFEST = ".prepare_written.json"  # the MUGE files prepare wrote into a --data-dir: name -> [size, mtime_ns]
LIST_CONVERTED = 1000  # converted images listed by id in a report, at most


# ---------------------------------------------------------------- cleaning


def _tsv_line(line: bytes, opts: dict) -> tuple[int | None, Cleaned]:
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) != 2:
        return None, skip("malformed_line", f"expected 2 tab-separated fields, found {len(fields)}")
    try:
        image_id = int(fields[0])
    except ValueError:
        return None, skip("bad_id", f"image id {fields[0][:40]!r} is not an integer")
    return image_id, clean_b64(fields[1], **opts)


def _file(path: str, opts: dict) -> Cleaned:
    """An image file cleaned; the data to store is base64."""
    try:
        r = clean_image(Path(path).read_bytes(), **opts)
    except OSError as e:
        return skip("missing_file", f"{type(e).__name__}: {e.strerror or e}")
    return r._replace(data=base64.urlsafe_b64encode(r.data)) if r.ok else r


def _cleaned(split: SplitInput, opts: dict) -> Iterator[tuple[int | str, int | None, Cleaned]]:
    """``(line number or path, image_id, Cleaned)`` of every image of ``split``, in input order."""
    if split.tsv is None:
        yield from ((path, image_id, _file(path, opts)) for image_id, path in split.files)
        return
    with open(split.tsv, "rb", buffering=1 << 20) as f:  # a buffer longer than a line: lines are read in C
        for lineno, line in enumerate(f, 1):
            if not line.isspace():
                yield lineno, *_tsv_line(line.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else line, opts)


def _where(where: int | str) -> str:
    return f"line {where}" if isinstance(where, int) else where


# ---------------------------------------------------------------- one output split's report


class _Report:
    """What ``report.json`` counts and lists for one output split."""

    def __init__(self, name: str, texts: list[Text]):
        self.name, self.texts, self.kept = name, texts, set()
        self.counts, self.by_reason, self.by_action, self.formats = Counter(), Counter(), Counter(), Counter()
        self.skipped, self.duplicates, self.converted, self.skipped_texts, self.partial = [], [], [], [], []

    def image(self, where: int | str, image_id: int | None, r: Cleaned) -> None:
        self.counts["images_total"] += 1
        if r.format:
            self.formats[r.format] += 1
        if r.status == "skipped":
            entry = {"image_id": image_id, "where": _where(where), "reason": r.reason, "detail": r.detail}
            if r.reason == "duplicate_id":
                self.duplicates.append(entry)
            else:
                self.skipped.append(entry)
                self.by_reason[r.reason] += 1
            return
        self.kept.add(image_id)
        self.counts[r.status] += 1
        if r.status == "converted":
            self.by_action.update(r.actions)
            if len(self.converted) < LIST_CONVERTED:
                self.converted.append({"image_id": image_id, "format": r.format, "actions": list(r.actions)})

    def pairs(self) -> Iterator[tuple[int, int, str]]:
        """The pairs of the texts with their kept images; texts left without any are noted."""
        for t in self.texts:
            if t.image_ids is None:
                self.counts["texts_unlabelled"] += 1
                continue
            present = [i for i in t.image_ids if i in self.kept]
            missing = [i for i in t.image_ids if i not in self.kept]
            if not present:
                detail = f"none of its images survived: {missing}"
                self.skipped_texts.append({"text_id": t.text_id, "reason": "no_images", "detail": detail})
                continue
            if missing:
                self.partial.append({"text_id": t.text_id, "missing_image_ids": missing})
                self.counts["pairs_dropped"] += len(missing)
            self.counts["texts_kept"] += 1
            yield from ((i, t.text_id, t.text) for i in present)

    def muge_texts(self) -> list[dict]:
        """The texts with at least one kept image, each with only its kept images."""
        rows = [(t, [i for i in t.image_ids or () if i in self.kept]) for t in self.texts]
        return [{"text_id": t.text_id, "text": t.text, "image_ids": ids} for t, ids in rows if ids]

    def as_dict(
        self, problems: list[dict], num_images: int, num_samples: int, seconds: float, source: str, lmdb
    ) -> dict:
        c = self.counts
        reasons = sorted(self.by_reason) + ["duplicate_id"] * bool(self.duplicates)
        return {
            "split": self.name,
            "source": source,
            "lmdb": str(lmdb),
            "num_images": num_images,
            "num_samples": num_samples,
            "images": {
                "total": c["images_total"],
                "kept": c["kept"],
                "converted": c["converted"],
                "skipped": len(self.skipped),
                "duplicates": len(self.duplicates),
                "skipped_by_reason": dict(self.by_reason),
                "converted_by_action": dict(self.by_action),
                "formats": dict(self.formats),
            },
            "texts": {
                "total": len(self.texts) + len(problems),
                "kept": c["texts_kept"],
                "unlabelled": c["texts_unlabelled"],
                "skipped": len(self.skipped_texts) + len(problems),
                "with_missing_images": len(self.partial),
            },
            "pairs": {"written": num_samples, "dropped_missing_image": c["pairs_dropped"]},
            "reasons": {k: REASONS[k] for k in reasons},
            "skipped_images": self.skipped,
            "duplicate_images": self.duplicates,
            "skipped_texts": problems + self.skipped_texts,
            "texts_with_missing_images": self.partial,
            "converted_images": self.converted,
            "converted_images_listed": len(self.converted),
            "seconds": round(seconds, 3),
            "images_per_second": round(c["images_total"] / seconds, 1) if seconds > 0 else None,
        }


def summary_line(r: dict) -> str:
    im, reasons = r["images"], ", ".join(f"{k} {v}" for k, v in sorted(r["images"]["skipped_by_reason"].items()))
    return (
        f"{r['split']}: {im['total']} images -> {r['num_images']} stored ({im['converted']} converted), "
        f"{im['skipped']} skipped{': ' + reasons if reasons else ''}, {im['duplicates']} duplicate ids; "
        f"{r['texts']['total']} texts -> {r['num_samples']} pairs in {r['lmdb']} ({r['images_per_second']} images/s)"
    )


# ---------------------------------------------------------------- one input split -> its output splits


def _build(split: SplitInput, outputs: list[tuple[str, list[Text]]], tmps: dict[str, Path], run: dict) -> list[dict]:
    """Clean ``split``'s images once into one LMDB per output ``(name, texts)`` (in ``tmps[name]``): an image
    goes to each output whose texts name it, else to the first. Returns the reports."""
    t0, muge_dir = time.perf_counter(), run["muge_dir"]
    reports = [_Report(name, texts) for name, texts in outputs]
    named = [{i for t in texts for i in t.image_ids or ()} for _, texts in outputs] if len(outputs) > 1 else []
    first: dict[int, int | str] = {}  # image id -> where it was stored from
    shown = run["progress"] and sys.stderr.isatty()  # a log file gets the summary line instead
    bar = tqdm(total=len(split.files) or None, desc=f"cleaning {split.name}", unit="img", disable=not shown)
    with contextlib.ExitStack() as stack:
        kinds = ("imgs.tsv", "texts.jsonl") if muge_dir else ()  # the MUGE files, in place once all is written
        muge = [stack.enter_context(atomic_path(muge_dir / f"{n}_{kind}")) for n, _ in outputs for kind in kinds]
        tsvs = [stack.enter_context(open(p, "wb")) for p in muge[::2]]
        with contextlib.ExitStack() as images:
            writers = [images.enter_context(Writer(tmps[name] / "imgs", b"num_images")) for name, _ in outputs]
            for where, image_id, r in _cleaned(split, run["opts"]):
                if r.ok and image_id in first:
                    detail = f"image id already stored from {_where(first[image_id])}; the first one wins"
                    r = r._replace(status="skipped", data=None, reason="duplicate_id", detail=detail)
                for k in [k for k, ids in enumerate(named) if image_id in ids] or [0]:
                    reports[k].image(where, image_id, r)
                    if r.ok:
                        writers[k].put(b"%d" % image_id, r.data)
                        if tsvs:
                            tsvs[k].write(b"%d\t%s\n" % (image_id, r.data))
                if r.ok:
                    first[image_id] = where
                bar.update()
        bar.close()
        out = []
        for k, (name, _) in enumerate(outputs):
            rep = reports[k]
            n_pairs = write_pairs(tmps[name], rep.pairs())
            if muge:
                muge[2 * k + 1].write_text(
                    "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in rep.muge_texts()), encoding="utf-8"
                )
            source = run["source"] + (f", --make-valid from {split.name}" if k else "")
            problems = split.problems if k == 0 else []
            out.append(
                rep.as_dict(problems, writers[k].n, n_pairs, time.perf_counter() - t0, source, run["lmdb_dir"] / name)
            )
            with open(tmps[name] / "report.json", "w", encoding="utf-8") as f:  # swapped in with its folder
                f.write(json.dumps(out[-1], ensure_ascii=False, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
        empty = [r["split"] for r in out if not r["num_samples"]]
        if len(outputs) > 1 and empty:
            raise SolutionError(
                f"--make-valid would leave split {empty[0]!r} without a single pair (the images of its "
                f"queries were all skipped): nothing written; give a larger fraction or clean the data"
            )
    for rep in out:
        log.info("%s", summary_line(rep))
    return out


# ---------------------------------------------------------------- where prepare writes


def check_split_name(name: str) -> str:
    """A split name is one plain folder name (it becomes ``LMDB_DIR/NAME`` and ``DATA_DIR/NAME_*``)."""
    if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise SolutionError(f"split name {name!r} is not a plain name (letters, digits, '_', '-')")
    return name


def _check_split_dir(final: Path) -> None:
    """Refuse to replace ``final`` unless it is absent or an LMDB split (see :data:`SPLIT_ENTRIES`)."""
    check_output(final, is_dir=True, what="LMDB split")
    other = sorted(set(os.listdir(final)) - SPLIT_ENTRIES) if final.is_dir() else []
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise SolutionError(
            f"{final} holds {shown}: not an LMDB split (only imgs, pairs, report.json); "
            f"refusing to replace it, choose another --lmdb-dir"
        )


def _recover(lmdb_dir: Path, name: str) -> None:
    """Under the split's lock: remove a killed run's temp folder; put back a split it left as ``.NAME.old``
    (killed between its two renames)."""
    if (lmdb_dir / f".{name}.building").is_dir():
        shutil.rmtree(lmdb_dir / f".{name}.building", ignore_errors=True)
        log.info("removed %s, left by a prepare that did not finish", lmdb_dir / f".{name}.building")
    final, old = lmdb_dir / name, lmdb_dir / f".{name}.old"
    if old.is_dir() and final.exists():
        shutil.rmtree(old, ignore_errors=True)
    elif old.is_dir():
        old.rename(final)
        log.warning("restored %s from %s (a prepare was killed while swapping it in)", final, old.name)


@contextlib.contextmanager
def _building(lmdb_dir: Path, names: Sequence[str]) -> Iterator[dict[str, Path]]:
    """Lock the splits ``names``, yield ``{name: temp folder}`` to build them in, and swap them all in when
    the block succeeds; on any error the previous splits stay as they were."""
    for name in names:  # a refusal before the locks leaves not even a lock file
        _check_split_dir(lmdb_dir / name)
    with contextlib.ExitStack() as stack:
        for name in sorted(set(names)):
            stack.enter_context(folder_lock(lmdb_dir / f".{name}.lock", f"LMDB split {lmdb_dir / name}"))
        for name in names:
            _recover(lmdb_dir, name)
            _check_split_dir(lmdb_dir / name)
        tmps: dict[str, Path] = {}
        try:
            for name in names:
                tmps[name] = lmdb_dir / f".{name}.building"
                tmps[name].mkdir()
            yield tmps
            for name, tmp in tmps.items():
                final, old = lmdb_dir / name, lmdb_dir / f".{name}.old"
                if final.exists():
                    final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
        except SolutionError:
            raise
        except Exception as e:
            if is_disk_full(e, lmdb_dir):  # asked before the partial folders are removed
                raise SolutionError(
                    f"disk full at {lmdb_dir}: the previous LMDB split(s) {', '.join(names)} are kept, "
                    "the partial ones removed"
                ) from None
            raise
        finally:
            for tmp in tmps.values():
                shutil.rmtree(tmp, ignore_errors=True)


def _stamp(p: Path) -> list[int]:
    return [p.stat().st_size, p.stat().st_mtime_ns]


def _check_muge(data_dir: Path, names: Sequence[str], inputs: list[Path]) -> dict:
    """The manifest of MUGE files prepare wrote; refuse any of ``names``' files it did not write."""
    check_output(data_dir, is_dir=True, what="--data-dir")
    try:
        written = json.loads((data_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        written = {}
    written = written if isinstance(written, dict) else {}
    for name in names:
        for p in (data_dir / f"{name}_imgs.tsv", data_dir / f"{name}_texts.jsonl"):
            check_output(p, inputs=inputs, what="MUGE output")
            if p.exists() and written.get(p.name) != _stamp(p):
                raise SolutionError(
                    f"{p} already exists and was not written by prepare (or was changed since); refusing to "
                    f"overwrite it: give another --data-dir for the MUGE files, or move it away"
                )
    return written


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
    :class:`SolutionError` line each) before anything is written. ``workers`` is accepted for old
    callers and ignored: images are cleaned in this process."""
    data_dir, table = Path(data_dir), csv or captions
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
    if images_dir and not table:
        raise SolutionError("--images-dir needs --captions FILE (or --csv FILE)")
    if images_dir and not Path(images_dir).is_dir():
        raise SolutionError(f"--images-dir {images_dir} is not a directory")
    if table:
        check_output(data_dir, is_dir=True, what="--data-dir")
        inputs = read_table(str(table), splits, Path(images_dir) if images_dir else None)
    elif not data_dir.is_dir():
        raise SolutionError(f"--data-dir {data_dir} is not a directory")
    else:
        inputs = {s: read_muge(data_dir, s) for s in splits if not (make_valid and s == valid_name)}
    lmdb_dir = check_output(lmdb_dir or data_dir / "lmdb", is_dir=True, what="--lmdb-dir")
    plan = []  # (input split, [(output name, its texts)])
    for name in splits:
        if make_valid and name == valid_name:
            continue
        if name not in inputs:
            raise SolutionError(f"no rows for split {name!r} in {table} (splits found: {', '.join(inputs)})")
        split = inputs[name]
        outputs = [(name, split.texts)]
        if make_valid and name == splits[0]:
            if valid_name in inputs and inputs[valid_name].texts:
                raise SolutionError(f"the input already has a {valid_name!r} split; drop --make-valid")
            train, valid = split_off_valid(split.texts, make_valid, seed, where=split.texts_path or table)
            outputs = [(name, train), (valid_name, valid)]
        plan.append((split, outputs))
    opts = {"max_side": max_side, "quality": quality, "max_pixels": max_pixels, "check": check}
    names = [name for _, outputs in plan for name, _ in outputs]
    run = {
        "opts": opts,
        "progress": progress,
        "source": "csv" if csv else "folder" if captions else "muge",
        "muge_dir": data_dir if table else None,
        "lmdb_dir": lmdb_dir,
    }
    reports: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:  # every check first: a refusal leaves nothing written
        if table:
            tables = [Path(str(table).replace("{split}", s)) for s in splits]
            _check_muge(data_dir, names, tables)  # before the lock: a refusal leaves not even a lock file
            stack.enter_context(folder_lock(data_dir / ".prepare.lock", f"--data-dir {data_dir}"))
            written = _check_muge(data_dir, names, tables)
        tmps = stack.enter_context(_building(lmdb_dir, names))
        for split, outputs in plan:
            reports.update((r["split"], r) for r in _build(split, outputs, tmps, run))
            if table:
                for name, _ in outputs:
                    for p in (data_dir / f"{name}_imgs.tsv", data_dir / f"{name}_texts.jsonl"):
                        written[p.name] = _stamp(p)
                write_json(data_dir / MANIFEST, written)
    return reports
