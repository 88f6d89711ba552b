"""Reading the three input formats of ``solution.prepare`` into texts + image sources, and
``--make-valid``'s query-disjoint split. No image is touched here.

1. MUGE / Tianchi: ``DIR/{split}_imgs.tsv`` + ``DIR/{split}_texts.jsonl`` (:func:`read_muge`,
   :func:`load_muge_texts`).
2. A CSV/TSV with ``text,image_path[,text_id,image_id,split]`` and
3. a folder of images + captions JSON lines ``{image, text[, text_id, image_id, split]}``
   (both :func:`read_table`).

Problems with texts (malformed, empty, duplicate ``text_id``) are collected in
``SplitInput.problems`` for the report, never raised; a file that yields no valid text at all,
or lacks the needed columns, is a :class:`SolutionError`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from solution.common import SolutionError

TEXT_REASONS = {
    "no_images": "none of its images survived cleaning",
    "duplicate_text_id": "text_id seen before",
    "malformed": "not a valid text record",
    "empty_text": "the text is empty",
}


class Text:
    """One query text (plain slotted classes here, not dataclasses: importing ``dataclasses`` costs
    ``solution.prepare`` ~20 ms of start-up before its workers can fork)."""

    __slots__ = ("image_ids", "text", "text_id")

    def __init__(self, text_id: int, text: str, image_ids: list[int] | None):
        self.text_id, self.text = text_id, text
        self.image_ids = image_ids  # None: unlabelled (test queries without image_ids, or [])

    def __eq__(self, other):
        return type(other) is Text and (self.text_id, self.text, self.image_ids) == (
            other.text_id,
            other.text,
            other.image_ids,
        )

    __hash__ = None  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return f"Text(text_id={self.text_id!r}, text={self.text!r}, image_ids={self.image_ids!r})"


class SplitInput:
    """One input split: its texts (None: not read yet, format 1, see :func:`load_muge_texts`), its TSV and
    texts file (format 1) or image files (formats 2/3: ``(image_id, path)``), the texts refused while reading."""

    __slots__ = ("files", "name", "problems", "texts", "texts_path", "tsv")

    def __init__(
        self,
        name: str,
        texts: list[Text] | None,
        tsv: Path | None = None,
        texts_path: Path | None = None,
        files: list[tuple[int, str]] | None = None,
        problems: list[dict] | None = None,
    ):
        self.name, self.texts, self.tsv, self.texts_path, self.files = name, texts, tsv, texts_path, files
        self.problems = [] if problems is None else problems

    def __repr__(self) -> str:
        return f"SplitInput(name={self.name!r}, tsv={self.tsv!r}, texts_path={self.texts_path!r})"


# ---------------------------------------------------------------- reading inputs


def _as_text(obj, where, split: SplitInput, seen: set[int]) -> Text | None:
    """One text record -> :class:`Text`, or None with the problem noted in ``split.problems``.

    ``where`` (a string, or ``(file name, line number)``) says where the record came from in a problem."""
    if type(obj) is dict:  # the common, well-formed case, checked cheaply (a MUGE file has ~10^5 lines)
        text_id, text, image_ids = obj.get("text_id"), obj.get("text"), obj.get("image_ids")
        if (
            type(text_id) is int
            and type(text) is str
            and text_id not in seen
            and (image_ids is None or (type(image_ids) is list and all(type(i) is int for i in image_ids)))
        ):
            text = text.strip()
            if text:
                seen.add(text_id)
                return Text(text_id, text, image_ids or None)

    def bad(reason, detail):
        split.problems.append(
            {
                "where": f"{where[0]}:{where[1]}" if isinstance(where, tuple) else where,
                "text_id": obj.get("text_id") if isinstance(obj, dict) else None,
                "reason": reason,
                "detail": detail,
            }
        )

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
        return bad("duplicate_text_id", "text_id seen before in this split; the first one wins")
    seen.add(text_id)
    return Text(text_id, text, image_ids)


def read_muge(data_dir: Path, name: str, *, texts: bool = True) -> SplitInput:
    """Format 1. With ``texts=False`` only the files are checked; :func:`load_muge_texts` reads the
    texts later (``solution.prepare`` reads them while its workers already check the images)."""
    tsv, texts_path = data_dir / f"{name}_imgs.tsv", data_dir / f"{name}_texts.jsonl"
    for p in (tsv, texts_path):
        if not p.is_file():
            raise SolutionError(
                f"{p} not found: --data-dir needs MUGE files {name}_imgs.tsv and {name}_texts.jsonl "
                f"(or give --csv FILE, or --images-dir DIR --captions FILE)"
            )
    split = SplitInput(name, None, tsv=tsv, texts_path=texts_path)
    return load_muge_texts(split) if texts else split


_NOT_JSON = object()


def load_muge_texts(split: SplitInput) -> SplitInput:
    """Read ``split.texts_path`` (MUGE ``{split}_texts.jsonl``) into ``split.texts``, once."""
    if split.texts is not None:
        return split
    texts_path, seen, texts = split.texts_path, set(), []
    try:
        with open(texts_path, encoding="utf-8-sig") as f:
            numbered = [(lineno, line) for lineno, line in enumerate(f, 1) if not line.isspace()]
    except UnicodeDecodeError:  # read again, as bytes, to say where
        with open(texts_path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise SolutionError(f"{texts_path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
        raise
    try:  # one parse for the whole file when every line is one JSON value (the common case)
        objs = json.loads("[" + ",".join(line for _, line in numbered) + "]")
        if len(objs) != len(numbered):  # a line holding two values ("1, 2"): read line by line
            raise ValueError
    except ValueError:  # JSONDecodeError is one
        objs = []
        for lineno, line in numbered:
            try:
                objs.append(json.loads(line))
            except json.JSONDecodeError as e:
                objs.append(_NOT_JSON)
                split.problems.append(
                    {
                        "where": f"{texts_path.name}:{lineno}",
                        "text_id": None,
                        "reason": "malformed",
                        "detail": f"not JSON ({e.msg})",
                    }
                )
    name = texts_path.name
    for (lineno, _), obj in zip(numbered, objs):
        if obj is not _NOT_JSON:
            t = _as_text(obj, (name, lineno), split, seen)
            if t:
                texts.append(t)
    split.texts = texts
    if not texts and split.problems:
        raise SolutionError(f"{texts_path}: no valid text record (first problem: {split.problems[0]['detail']})")
    return split


_IMAGE_KEYS = ("image_path", "image", "path", "file", "file_name", "filename", "img")
_TEXT_KEYS = ("text", "caption", "query")
_ONE_LINE_KEYS = (*_IMAGE_KEYS, "text_id", "image_id", "split")  # a line break in one of these: a quote left open


def _pick(row: dict, keys: Sequence[str]):
    for k in keys:
        if row.get(k) not in (None, ""):
            return row[k]
    return None


_BARE_CR = re.compile(r"(?<=\r)(?!\n)")  # after a CR that ends a line on its own (old Mac files)


def _utf8_lines(path: Path, f, split_cr: bool = False) -> Iterator[str]:
    """The lines of binary file ``f``, decoded, with their ends (``split_cr``: a lone CR ends one too,
    as with ``newline=""``); a line that is not UTF-8 is an error naming it."""
    lineno = 0
    for raw in f:
        lineno += 1
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise SolutionError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
        if split_cr and "\r" in line:
            *first, line = [p for p in _BARE_CR.split(line) if p]
            for part in first:
                yield part
                lineno += 1
        yield line


def _read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        if path.suffix.lower() in (".jsonl", ".json"):
            for lineno, line in enumerate(_utf8_lines(path, f), 1):
                if line.strip():
                    try:
                        yield f"{path.name}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SolutionError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            return
        yield from _read_csv(path, _utf8_lines(path, f, split_cr=True))


def _read_csv(path: Path, lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """Rows of a CSV/TSV, each with the line it starts on. ``strict``: a quote left open to the end of
    the file, or stray text after a closing one, is an error naming the line, not rows swallowed."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(lines, delimiter=delimiter, strict=True)
    end = 0  # the line the previous record ended on
    try:
        cols = [c.strip() for c in reader.fieldnames or []]
        if not any(c in cols for c in _TEXT_KEYS) or not any(c in cols for c in _IMAGE_KEYS):
            raise SolutionError(f"{path}: needs columns text and image_path (found: {', '.join(cols) or 'none'})")
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            row = {k.strip(): v for k, v in row.items() if k}
            if end > start:
                _check_multiline(path, start, end, row, delimiter)
            yield f"{path.name}:{start}", row
    except csv.Error as e:
        what = (
            "a quote opened here is never closed (it runs to the end of the file)"
            if "unexpected end of data" in str(e)
            else f"malformed CSV ({e})"
        )
        raise SolutionError(f"{path}:{end + 1}: {what}") from None


def _check_multiline(path: Path, start: int, end: int, row: dict, delimiter: str) -> None:
    """A record over several lines: a quoted caption may hold a line break, but a line break in an
    image path or id, or caption lines that look like rows, mean a quote left open."""
    for k, v in row.items():
        if not isinstance(v, str) or "\n" not in v:
            continue
        if k in _ONE_LINE_KEYS or (k in _TEXT_KEYS and any(delimiter in part for part in v.split("\n")[1:])):
            raise SolutionError(
                f"{path}:{start}: a quote opened here runs over lines {start}-{end} and swallows "
                f"what look like rows (column {k!r}); close the quote"
            )


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
                split.problems.append(
                    {
                        "where": where,
                        "text_id": row.get("text_id"),
                        "reason": "malformed",
                        "detail": "needs a non-empty text and an image path",
                    }
                )
                continue
            try:
                tid = None if row.get("text_id") in (None, "") else int(row["text_id"])
                iid = None if row.get("image_id") in (None, "") else int(row["image_id"])
            except (TypeError, ValueError):
                split.problems.append(
                    {
                        "where": where,
                        "text_id": row.get("text_id"),
                        "reason": "malformed",
                        "detail": "image_id and text_id must be integers",
                    }
                )
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
        g = groups.setdefault(name, {}).setdefault(
            ("id", tid) if tid is not None else ("text", text), {"text_id": tid, "text": text, "image_ids": []}
        )
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


def split_off_valid(texts: list[Text], fraction: float, seed: int, where=None) -> tuple[list[Text], list[Text]]:
    """Split labelled texts so no query text (case/space-normalised) is in both parts; either part
    left empty is an error (``where``: the input, for the message)."""
    import math

    import numpy as np
    from sklearn.model_selection import GroupShuffleSplit

    if not 0.0 < fraction < 1.0:
        raise SolutionError(f"--make-valid takes a fraction between 0 and 1, got {fraction}")
    labelled = [t for t in texts if t.image_ids]
    groups = ["".join(t.text.lower().split()) for t in labelled]
    n = len(set(groups))
    src = f"{where}: " if where else ""
    if n < 2:
        raise SolutionError(f"{src}--make-valid needs at least two distinct labelled queries, found {n}")
    n_valid = math.ceil(fraction * n)  # as GroupShuffleSplit counts
    if not 0 < n_valid < n:
        raise SolutionError(
            f"{src}--make-valid {fraction} of {n} distinct labelled queries leaves "
            f"{'no validation' if n_valid < 1 else 'no training'} query; choose a fraction "
            f"that leaves both splits at least one"
        )
    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    train_idx, valid_idx = next(gss.split(np.zeros(len(labelled)), groups=groups))
    valid = [labelled[i] for i in sorted(valid_idx)]
    valid_ids = {t.text_id for t in valid}
    return [t for t in texts if t.text_id not in valid_ids], valid
