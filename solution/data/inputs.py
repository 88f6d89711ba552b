"""The inputs of ``solution.prepare``: MUGE files (``{split}_imgs.tsv`` + ``{split}_texts.jsonl``) or a table (CSV/TSV
or JSON lines of text + image path), and ``--make-valid``. A bad text record is noted for the report; an unreadable
file is one :class:`SolutionError` naming the file and line."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from solution.common import SolutionError

_IMAGE_KEYS = ("image_path", "image", "path", "file", "file_name", "filename", "img")
_TEXT_KEYS = ("text", "caption", "query")
_ONE_LINE_KEYS = (*_IMAGE_KEYS, "text_id", "image_id", "split")  # a line break in one of these: a quote left open


class Text(NamedTuple):
    text_id: int
    text: str
    image_ids: list[int] | None  # None: unlabelled (test queries)


@dataclass
class SplitInput:
    """One input split: its texts, and its images as a MUGE TSV or as ``(image_id, path)`` files."""

    name: str
    texts: list[Text] = field(default_factory=list)
    tsv: Path | None = None
    texts_path: Path | None = None
    files: list[tuple[int, str]] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)  # texts refused while reading

    def problem(self, where: str, obj, reason: str, detail: str) -> None:
        text_id = obj.get("text_id") if isinstance(obj, dict) else None
        self.problems.append({"where": where, "text_id": text_id, "reason": reason, "detail": detail})

    def add_text(self, obj, where: str, seen: set[int]) -> None:
        """Append one text record, or note why it is refused."""
        if not isinstance(obj, dict) or "text_id" not in obj or "text" not in obj:
            return self.problem(where, obj, "malformed", "needs text_id and text")
        try:
            text_id = int(obj["text_id"])
            image_ids = [int(i) for i in obj.get("image_ids") or ()] or None
        except (TypeError, ValueError):
            return self.problem(where, obj, "malformed", "text_id and image_ids must be integers")
        text = str(obj["text"]).strip()
        if not text:
            return self.problem(where, obj, "empty_text", "the text is empty")
        if text_id in seen:
            return self.problem(where, obj, "duplicate_text_id", "text_id seen before; the first one wins")
        seen.add(text_id)
        self.texts.append(Text(text_id, text, image_ids))


def _decoded(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 is an error naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = len((data[: e.start] + b"x").splitlines())
        raise SolutionError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the file)") from None


def read_muge(data_dir: Path, name: str) -> SplitInput:
    """Format 1: the split's TSV and its texts."""
    tsv, texts_path = data_dir / f"{name}_imgs.tsv", data_dir / f"{name}_texts.jsonl"
    for p in (tsv, texts_path):
        if not p.is_file():
            raise SolutionError(
                f"{p} not found: --data-dir needs MUGE files {name}_imgs.tsv and {name}_texts.jsonl "
                "(or give --csv FILE)"
            )
    split, seen = SplitInput(name, tsv=tsv, texts_path=texts_path), set()
    for lineno, line in enumerate(_decoded(texts_path).split("\n"), 1):
        where = f"{texts_path.name}:{lineno}"
        if not line.strip():
            continue
        try:
            split.add_text(json.loads(line), where, seen)
        except json.JSONDecodeError as e:
            split.problem(where, None, "malformed", f"not JSON ({e.msg})")
    if not split.texts and split.problems:
        raise SolutionError(f"{texts_path}: no valid text record (first problem: {split.problems[0]['detail']})")
    return split


def _pick(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if row.get(k) not in (None, "")), None)


def _rows(path: Path):
    """``(where, row)`` of a JSON-lines file, or of a CSV/TSV (strict: a quote left open is an error)."""
    text = _decoded(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        for lineno, line in enumerate(text.split("\n"), 1):
            try:
                if line.strip():
                    yield f"{path.name}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise SolutionError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    end = 0  # the line the previous record ended on
    try:
        cols = [c.strip() for c in reader.fieldnames or []]
        if not set(cols) & set(_TEXT_KEYS) or not set(cols) & set(_IMAGE_KEYS):
            raise SolutionError(f"{path}: needs columns text and image_path (found: {', '.join(cols) or 'none'})")
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            row = {k.strip(): v for k, v in row.items() if k}
            for k, v in row.items():  # a quoted caption may hold a line break, but not before what looks like a row
                lines = v.split("\n")[1:] if isinstance(v, str) else ()
                if lines and (k in _ONE_LINE_KEYS or (k in _TEXT_KEYS and any(sep in part for part in lines))):
                    raise SolutionError(
                        f"{path}:{start}: a quote opened here runs over lines {start}-{end} and swallows "
                        f"what look like rows (column {k!r}); close the quote"
                    )
            yield f"{path.name}:{start}", row
    except csv.Error as e:
        what = "a quote opened here is never closed" if "unexpected end of data" in str(e) else f"malformed CSV ({e})"
        raise SolutionError(f"{path}:{end + 1}: {what}") from None


def read_table(table: str, splits: list[str], base_dir: Path | None) -> dict[str, SplitInput]:
    """A table -> one SplitInput per split. Rows with the same ``text_id`` (or, without one, the same text) in a
    split form one query; missing ids are numbered above the largest given one, one image id per distinct file."""
    files = [(s, Path(table.replace("{split}", s))) for s in splits] if "{split}" in table else [(None, Path(table))]
    out: dict[str, SplitInput] = {}
    rows = []  # (split, text, path, text_id, image_id)
    for fixed, path in files:
        if not path.is_file():
            raise SolutionError(f"{path} not found")
        for where, row in _rows(path):
            name = fixed or str(row.get("split") or splits[0]).strip()
            split = out.setdefault(name, SplitInput(name))
            text, rel = _pick(row, _TEXT_KEYS), _pick(row, _IMAGE_KEYS)
            if text is None or rel is None or not str(text).strip():
                split.problem(where, row, "malformed", "needs a non-empty text and an image path")
                continue
            try:
                ids = [None if row.get(k) in (None, "") else int(row[k]) for k in ("text_id", "image_id")]
            except (TypeError, ValueError):
                split.problem(where, row, "malformed", "image_id and text_id must be integers")
                continue
            rows.append((name, str(text).strip(), str(((base_dir or path.parent) / str(rel)).resolve()), *ids))
    next_text, next_image = (max([r[k] for r in rows if r[k] is not None], default=0) + 1 for k in (3, 4))
    path_ids: dict[str, int] = {}
    groups: dict[str, dict[tuple, dict]] = {name: {} for name in out}
    for name, text, path, tid, iid in rows:
        iid = path_ids.setdefault(path, next_image + len(path_ids)) if iid is None else iid
        key = ("id", tid) if tid is not None else ("text", text)
        g = groups[name].setdefault(key, {"text_id": tid, "text": text, "image_ids": []})
        if iid not in g["image_ids"]:
            g["image_ids"].append(iid)
        out[name].files.append((iid, path))
    for name, gs in groups.items():
        out[name].files, seen = list(dict.fromkeys(out[name].files)), set()
        for g in gs.values():
            if g["text_id"] is None:
                g["text_id"], next_text = next_text, next_text + 1
            out[name].add_text(g, f"text {g['text']!r}", seen)
    return out


def split_off_valid(texts: list[Text], fraction: float, seed: int, where=None) -> tuple[list[Text], list[Text]]:
    """Split labelled texts so no query text (case/space-normalised) is in both parts; either part
    left empty is an error (``where``: the input, for the message)."""
    import numpy as np
    from sklearn.model_selection import GroupShuffleSplit

    if not 0.0 < fraction < 1.0:
        raise SolutionError(f"--make-valid takes a fraction between 0 and 1, got {fraction}")
    labelled = [t for t in texts if t.image_ids]
    groups = ["".join(t.text.lower().split()) for t in labelled]
    n, src = len(set(groups)), f"{where}: " if where else ""
    if n < 2:
        raise SolutionError(f"{src}--make-valid needs at least two distinct labelled queries, found {n}")
    if math.ceil(fraction * n) >= n:  # as GroupShuffleSplit counts
        raise SolutionError(f"{src}--make-valid {fraction} of {n} distinct labelled queries leaves no training query")
    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, valid_idx = next(gss.split(np.zeros(len(labelled)), groups=groups))
    valid = [labelled[i] for i in sorted(valid_idx)]
    valid_ids = {t.text_id for t in valid}
    return [t for t in texts if t.text_id not in valid_ids], valid
