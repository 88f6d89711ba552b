"""A run folder's records and the names of its files: ``metrics.jsonl`` (one reader, one writer),
``params.json`` and the checkpoints others look for.

``metrics.jsonl`` holds one JSON object a line, ``{"step", "epoch", "kind": "train"|"valid", ...}``;
``valid`` lines carry ``set`` (``valid`` for the main one) and ``r1``/``r5``/``r10``/``mean_recall``
in percent. The trainer appends a line at a time, so a kill can tear the last line: readers skip
exactly that line with a warning and refuse anything else malformed, naming file and line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from solution.common import SolutionError, append_jsonl, disk_full_as_error, json_line, write_json, write_jsonl

METRICS, PARAMS = "metrics.jsonl", "params.json"
BEST_CHECKPOINT, LATEST_CHECKPOINT = "checkpoints/best.pt", "checkpoints/epoch_latest.pt"
MAIN_SET = "valid"


def parse_lines(path: str | os.PathLike, data: bytes, complete: bool = True, first: int = 1) -> list[dict]:
    """The JSON objects of ``data`` (lines numbered from ``first``); its last line may be torn when
    ``complete`` is False (more may still come) or when it has no newline (a kill cut it)."""
    lines = data.split(b"\n")
    rows = []
    for i, raw in enumerate(lines, first):
        row = json_line(path, i, raw, last=i == first + len(lines) - 1 and (not complete or not data.endswith(b"\n")))
        if row is not None and not isinstance(row, dict):
            raise SolutionError(f"{path}:{i}: record {i} is a {type(row).__name__}, not a JSON object")
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
    """A validation record of ``set_name`` (``set`` defaults to the main one in old files)."""
    return row.get("kind") == "valid" and row.get("set", MAIN_SET) == set_name


def main_valid(rows: list[dict], set_name: str = MAIN_SET, key: str | None = "mean_recall") -> list[dict]:
    """The validation records of ``set_name`` holding ``key`` (when given), in file order."""
    return [r for r in rows if is_main_valid(r, set_name) and (key is None or key in r)]


class MetricsTail:
    """Reads the complete lines appended to a ``metrics.jsonl`` since the last call (a live run)."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.offset, self.lineno = Path(path), 0, 0

    def read_new(self, final: bool = False) -> list[dict]:
        """The records completed since the last call; with ``final`` (the writer has exited) also a
        last line without a newline, skipped with a warning when a kill tore it."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        chunk = chunk if final else chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(chunk)
        rows = parse_lines(self.path, chunk, first=self.lineno + 1)
        self.lineno += chunk.count(b"\n")
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
