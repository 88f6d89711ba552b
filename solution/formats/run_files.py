"""A run folder's records: ``metrics.jsonl`` (one reader, one writer) and ``params.json``.

``metrics.jsonl`` holds one JSON object a line, ``{"step", "epoch", "kind": "train"|"valid", ...}``;
``valid`` lines carry ``set`` (the validation set's name, ``valid`` for the main one) and
``r1``/``r5``/``r10``/``mean_recall`` in percent. The trainer appends a line at a time, so a kill
can leave the last line torn: :func:`read_metrics` skips exactly that line with a warning and
refuses anything else malformed with one line naming the file and line; :class:`MetricsTail` reads
a live run's new lines the same way. :func:`main_valid` / :func:`is_main_valid` are the one filter
for the main validation set's records.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from solution.common import SolutionError, append_jsonl, disk_full_as_error, json_line, write_json, write_jsonl

log = logging.getLogger(__name__)

METRICS, PARAMS = "metrics.jsonl", "params.json"
MAIN_SET = "valid"


def _parse(path: Path, lineno: int, raw: bytes, last: bool) -> dict | None:
    """One line as a JSON object (see :func:`json_line`)."""
    row = json_line(path, lineno, raw, last)
    if row is not None and not isinstance(row, dict):
        raise SolutionError(f"{path}:{lineno}: record {lineno} is a {type(row).__name__}, not a JSON object")
    return row


def parse_lines(path: str | os.PathLike, data: bytes, complete: bool = True) -> list[dict]:
    """The records in ``data``, the bytes of a JSON-lines file of objects (``metrics.jsonl``, and the
    soup log the report reads the same way); the last line may be torn when ``complete`` is False
    (more may still be appended) or when it has no newline (a kill cut it)."""
    path = Path(path)
    lines = data.split(b"\n")
    torn_tail = not data.endswith(b"\n")
    rows = []
    for i, raw in enumerate(lines, 1):
        last = i == len(lines) and (torn_tail or not complete)
        row = _parse(path, i, raw, last)
        if row is not None:
            rows.append(row)
    return rows


def read_metrics(path: str | os.PathLike, missing_ok: bool = True) -> list[dict]:
    """All records of a ``metrics.jsonl`` (``[]`` for a missing file when ``missing_ok``)."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise SolutionError(f"file not found: {path}")
    return parse_lines(path, path.read_bytes())


def append_metric(path: str | os.PathLike, row: dict) -> None:
    """Append one record (a full disk is one ``disk full at PATH`` line)."""
    with disk_full_as_error(path):
        append_jsonl(path, row)


def rewrite_metrics(path: str | os.PathLike, rows: list[dict]) -> None:
    """Replace the file with ``rows`` atomically (on resume: drop what came after the checkpoint)."""
    write_jsonl(path, rows)


def is_main_valid(row: dict, set_name: str = MAIN_SET) -> bool:
    """A validation record of the main validation set, or of ``set_name`` when given (``set``
    defaults to the main one in old files)."""
    return row.get("kind") == "valid" and row.get("set", MAIN_SET) == set_name


def main_valid(rows: list[dict], set_name: str = MAIN_SET, key: str | None = "mean_recall") -> list[dict]:
    """The main validation set's records (or ``set_name``'s), those holding ``key`` when given, in
    file order."""
    return [r for r in rows if is_main_valid(r, set_name) and (key is None or key in r)]


class MetricsTail:
    """Reads the complete lines appended to a ``metrics.jsonl`` since the last call (a live run)."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.offset, self.lineno = Path(path), 0, 0

    def read_new(self, final: bool = False) -> list[dict]:
        """The records of the lines completed since the last call; with ``final`` (the writer has
        exited) also a last line without a newline, skipped with a warning when a kill tore it."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = len(chunk) if final else chunk.rfind(b"\n") + 1
        self.offset += end
        lines = chunk[:end].split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        rows = []
        for i, raw in enumerate(lines, 1):
            self.lineno += 1
            row = _parse(self.path, self.lineno, raw, last=final and i == len(lines))
            if row is not None:
                rows.append(row)
        return rows


def read_params(run_dir: str | os.PathLike) -> dict | None:
    """A run's ``params.json`` (None when absent); malformed is one line naming the file."""
    path = Path(run_dir) / PARAMS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SolutionError(f"{path}: not a valid JSON file ({e})") from None
    if not isinstance(data, dict):
        raise SolutionError(f"{path}: expected a JSON object")
    return data


def write_params(run_dir: str | os.PathLike, record: dict) -> None:
    """Write a run's ``params.json`` atomically (the resolved flags, plus ``typed``: the flags as given)."""
    write_json(Path(run_dir) / PARAMS, record)
