"""A run folder's files: ``metrics.jsonl`` (one JSON object a line, ``{"step", "epoch", "kind": "train"|"valid",
...}``; ``valid`` lines carry ``set`` and recalls in percent; a last line torn by a kill is skipped with a warning),
``params.json`` and the checkpoints others look for."""

import json
import os
from pathlib import Path

from solution.common import SolutionError, disk_full_as_error, json_line

METRICS, PARAMS = "metrics.jsonl", "params.json"
BEST_CHECKPOINT, LATEST_CHECKPOINT = "checkpoints/best.pt", "checkpoints/epoch_latest.pt"
MAIN_SET = "valid"


def parse_lines(path: str | os.PathLike, data: bytes, first: int = 1) -> list[dict]:
    """The JSON objects of ``data`` (lines numbered from ``first``); a last line without a newline may be torn."""
    lines = data.split(b"\n")
    rows = []
    for i, raw in enumerate(lines, first):
        row = json_line(path, i, raw, last=i == first + len(lines) - 1)
        if row is not None and not isinstance(row, dict):
            raise SolutionError(f"{path}:{i}: record {i} is a {type(row).__name__}, not a JSON object")
        if row is not None:
            rows.append(row)
    return rows


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a ``metrics.jsonl`` (``[]`` for a missing file)."""
    path = Path(path)
    return parse_lines(path, path.read_bytes()) if path.is_file() else []


def append_metric(path: str | os.PathLike, row: dict) -> None:
    """Append one record (a full disk is one ``disk full at PATH`` line)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with disk_full_as_error(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
        """The records completed since the last call; with ``final`` (the writer has exited) also a last line
        without a newline."""
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
