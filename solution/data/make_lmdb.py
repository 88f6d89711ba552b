"""``prepare``: inputs (:mod:`.inputs`) -> images cleaned one by one (:mod:`.images`) -> cn_clip's LMDB layout, with
``{split}/report.json`` saying what was skipped and why. Splits are built in temp folders under their locks and swapped
in together at the end; a table input also writes the MUGE files, never over one prepare did not write."""

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

from solution.common import SolutionError, atomic_path, check_output, disk_full_as_error, folder_lock, write_json

from .images import CHECKS, DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, REASONS, Cleaned, clean_b64, clean_image, skip
from .inputs import SplitInput, Text, read_muge, read_table, split_off_valid
from .lmdb_io import Writer, write_pairs

log = logging.getLogger(__name__)

SPLIT_ENTRIES = {"imgs", "pairs", "report.json"}  # what a split folder of prepare (or cn_clip's builder) holds
MANIFEST = ".prepare_written.json"  # the MUGE files prepare wrote into a --data-dir: name -> [size, mtime_ns]
MUGE_FILES = ("imgs.tsv", "texts.jsonl")
LIST_CONVERTED = 1000  # converted images listed by id in a report, at most


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


def _cleaned(split: SplitInput, opts: dict) -> Iterator[tuple[str, int | None, Cleaned]]:
    """``(line or path, image_id, Cleaned)`` of every image of ``split``, in input order."""
    if split.tsv is None:
        yield from ((path, image_id, _file(path, opts)) for image_id, path in split.files)
        return
    with open(split.tsv, "rb", buffering=1 << 20) as f:  # a buffer longer than a line: lines are read in C
        for lineno, line in enumerate(f, 1):
            if not line.isspace():
                yield f"line {lineno}", *_tsv_line(line.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else line, opts)


class _Output:
    """One output split: its LMDB in its temp folder, its MUGE files (table inputs) and its report."""

    def __init__(self, name: str, texts: list[Text], tmp: Path, muge_dir: Path | None, stack: contextlib.ExitStack):
        self.name, self.texts, self.tmp, self.kept = name, texts, tmp, set()
        self.named = {i for t in texts for i in t.image_ids or ()}
        self.muge = [stack.enter_context(atomic_path(muge_dir / f"{name}_{k}")) for k in MUGE_FILES] if muge_dir else []
        self.tsv = stack.enter_context(open(self.muge[0], "wb")) if self.muge else None
        self.imgs = stack.enter_context(Writer(tmp / "imgs", b"num_images"))
        self.counts, self.by_action, self.formats = Counter(), Counter(), Counter()
        self.skipped, self.converted = [], []

    def image(self, where: str, image_id: int | None, r: Cleaned) -> None:
        self.counts[r.status] += 1
        self.formats.update([r.format] if r.format else [])
        if not r.ok:
            self.skipped.append({"image_id": image_id, "where": where, "reason": r.reason, "detail": r.detail})
            return
        self.kept.add(image_id)
        self.imgs.put(b"%d" % image_id, r.data)
        if self.tsv:
            self.tsv.write(b"%d\t%s\n" % (image_id, r.data))
        if r.status == "converted":
            self.by_action.update(r.actions)
            if len(self.converted) < LIST_CONVERTED:
                self.converted.append({"image_id": image_id, "format": r.format, "actions": list(r.actions)})

    def finish(self, problems: list[dict], source: str, final: Path, seconds: float) -> dict:
        """Write the pairs of the texts with their kept images, the MUGE texts and report.json; return the report."""
        kept, skipped_texts, partial, unlabelled = [], [], [], 0
        for t in self.texts:
            present = [i for i in t.image_ids or () if i in self.kept]
            missing = [i for i in t.image_ids or () if i not in self.kept]
            if t.image_ids is None:
                unlabelled += 1
            elif not present:
                detail = f"none of its images survived: {missing}"
                skipped_texts.append({"text_id": t.text_id, "reason": "no_images", "detail": detail})
            else:
                kept.append({"text_id": t.text_id, "text": t.text, "image_ids": present})
                if missing:
                    partial.append({"text_id": t.text_id, "missing_image_ids": missing})
        n_pairs = write_pairs(self.tmp, ((i, t["text_id"], t["text"]) for t in kept for i in t["image_ids"]))
        if self.muge:
            self.muge[1].write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in kept), encoding="utf-8")
        dups = [s for s in self.skipped if s["reason"] == "duplicate_id"]
        bad = [s for s in self.skipped if s["reason"] != "duplicate_id"]
        by_reason = Counter(s["reason"] for s in bad)
        c = self.counts
        report = {
            "split": self.name,
            "source": source,
            "lmdb": str(final),
            "num_images": self.imgs.n,
            "num_samples": n_pairs,
            "images": {
                "total": c.total(),
                "kept": c["kept"],
                "converted": c["converted"],
                "skipped": len(bad),
                "duplicates": len(dups),
                "skipped_by_reason": dict(by_reason),
                "converted_by_action": dict(self.by_action),
                "formats": dict(self.formats),
            },
            "texts": {
                "total": len(self.texts) + len(problems),
                "kept": len(kept),
                "unlabelled": unlabelled,
                "skipped": len(skipped_texts) + len(problems),
                "with_missing_images": len(partial),
            },
            "pairs": {"written": n_pairs, "dropped_missing_image": sum(len(p["missing_image_ids"]) for p in partial)},
            "reasons": {k: REASONS[k] for k in sorted(by_reason) + ["duplicate_id"] * bool(dups)},
            "skipped_images": bad,
            "duplicate_images": dups,
            "skipped_texts": problems + skipped_texts,
            "texts_with_missing_images": partial,
            "converted_images": self.converted,
            "seconds": round(seconds, 3),
            "images_per_second": round(c.total() / seconds, 1) if seconds > 0 else None,
        }
        write_json(self.tmp / "report.json", report)  # swapped in with its folder
        return report


def _build(split: SplitInput, outputs: list[tuple[str, list[Text]]], tmps: dict[str, Path], run: dict) -> list[dict]:
    """Clean ``split``'s images once into the LMDB of each output ``(name, texts)``: an image goes to each output
    whose texts name it, else to the first."""
    t0, first = time.perf_counter(), {}  # image id -> where it was stored from
    shown = run["progress"] and sys.stderr.isatty()  # a log file gets the summary line instead
    bar = tqdm(total=len(split.files) or None, desc=f"cleaning {split.name}", unit="img", disable=not shown)
    with contextlib.ExitStack() as stack:
        outs = [_Output(name, texts, tmps[name], run["muge_dir"], stack) for name, texts in outputs]
        for where, image_id, r in _cleaned(split, run["opts"]):
            if r.ok and image_id in first:
                r = skip("duplicate_id", f"already stored from {first[image_id]}; the first one wins", r.format)
            for out in [o for o in outs if image_id in o.named] or outs[:1]:
                out.image(where, image_id, r)
            if r.ok:
                first[image_id] = where
            bar.update()
        bar.close()
        reports = []
        for k, o in enumerate(outs):
            source = run["source"] + (f", --make-valid from {split.name}" if k else "")
            problems = split.problems if k == 0 else []
            reports.append(o.finish(problems, source, run["lmdb_dir"] / o.name, time.perf_counter() - t0))
        empty = [r["split"] for r in reports if not r["num_samples"]]
        if len(outs) > 1 and empty:
            raise SolutionError(
                f"--make-valid would leave split {empty[0]!r} without a single pair (the images of its "
                f"queries were all skipped): nothing written; give a larger fraction or clean the data"
            )
    for r in reports:
        im, why = r["images"], ", ".join(f"{k} {v}" for k, v in sorted(r["images"]["skipped_by_reason"].items()))
        line = (
            f"{r['split']}: {im['total']} images -> {r['num_images']} stored ({im['converted']} converted), "
            f"{im['skipped']} skipped{': ' + why if why else ''}, {im['duplicates']} duplicate ids; "
            f"{r['texts']['total']} texts -> {r['num_samples']} pairs in {r['lmdb']} ({r['images_per_second']} img/s)"
        )
        log.info("%s", line)
    return reports


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
            f"{final} holds {shown}: not an LMDB split; refusing to replace it, choose another --lmdb-dir"
        )


def _recover(lmdb_dir: Path, name: str) -> None:
    """Remove a killed run's temp folder; put back a split it left as ``.NAME.old`` (killed between two renames)."""
    tmp, final, old = lmdb_dir / f".{name}.building", lmdb_dir / name, lmdb_dir / f".{name}.old"
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("removed %s, left by a prepare that did not finish", tmp)
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
        tmps = {name: lmdb_dir / f".{name}.building" for name in names}
        try:
            with disk_full_as_error(lmdb_dir):  # asked before the partial folders are removed
                for tmp in tmps.values():
                    tmp.mkdir()
                yield tmps
                for name, tmp in tmps.items():
                    final, old = lmdb_dir / name, lmdb_dir / f".{name}.old"
                    if final.exists():
                        final.rename(old)
                    tmp.rename(final)
                    shutil.rmtree(old, ignore_errors=True)
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
    for p in (data_dir / f"{name}_{kind}" for name in names for kind in MUGE_FILES):
        check_output(p, inputs=inputs, what="MUGE file", own=lambda p: written.get(p.name) == _stamp(p))
    return written


def prepare(
    data_dir,
    splits: Sequence[str] | str = ("train", "valid", "test"),
    *,
    lmdb_dir=None,
    max_side: int | None = None,
    quality: int = DEFAULT_QUALITY,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    make_valid: float | None = None,
    valid_name: str = "valid",
    table: str | os.PathLike | None = None,
    images_dir=None,
    seed: int = 0,
    check: str = CHECKS[0],
    progress: bool = True,
) -> dict[str, dict]:
    """Build ``LMDB_DIR/{split}`` for each split (names, or one comma-separated string); returns {split: report}.
    ``table``: a CSV/TSV or JSON-lines file instead of MUGE files. Everything is checked before anything is written."""
    data_dir = Path(data_dir)
    names = splits.split(",") if isinstance(splits, str) else splits
    splits = [check_split_name(s) for s in dict.fromkeys(s.strip() for s in names) if s]
    if not splits:
        raise SolutionError("no split given (e.g. --splits train,valid,test)")
    if make_valid and check_split_name(valid_name) == splits[0]:
        raise SolutionError(f"--valid-name {valid_name!r} is the split --make-valid splits off from; choose another")
    if max_side is not None and max_side < 8:
        raise SolutionError(f"--max-side {max_side} is too small (at least 8)")
    if not 1 <= quality <= 100:
        raise SolutionError(f"--quality must lie in 1..100, got {quality}")
    if images_dir and not table:
        raise SolutionError("--images-dir needs --csv FILE (or --captions FILE)")
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
    names = [name for _, outputs in plan for name, _ in outputs]
    opts = {"max_side": max_side, "quality": quality, "max_pixels": max_pixels, "check": check}
    run = {"opts": opts, "progress": progress, "source": str(table or "muge"), "lmdb_dir": lmdb_dir}
    run["muge_dir"], reports = data_dir if table else None, {}
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
                written.update((f"{n}_{k}", _stamp(data_dir / f"{n}_{k}")) for n, _ in outputs for k in MUGE_FILES)
                write_json(data_dir / MANIFEST, written)
    return reports
