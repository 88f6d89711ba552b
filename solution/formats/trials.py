"""A search study's ``trials.csv``: one row per Optuna trial (number, state, value, run_dir, params_*, ...); a
malformed file is one error naming the file and line."""

import csv
import io
import os
from pathlib import Path

from solution.common import SolutionError, atomic_path

NAME, RUNS = "trials.csv", "trials"  # the table, and the folder of the trials' run folders


def write_trials(path: str | os.PathLike, table) -> None:
    """Write a pandas DataFrame of trials atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def read_trials(path: str | os.PathLike) -> list[dict]:
    """The rows as dicts of strings."""
    path = Path(path)
    if not path.is_file():
        raise SolutionError(f"file not found: {path}")
    data = path.read_bytes()
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""), strict=True)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SolutionError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    rows, line = [], 1
    try:
        if reader.fieldnames is not None:
            line = reader.line_num + 1  # where the next row starts (an unterminated quote runs on from there)
        for row in reader:
            if None in row:
                raise SolutionError(f"{path}:{line}: more fields than the header names")
            rows.append(row)
            line = reader.line_num + 1
    except csv.Error as e:
        raise SolutionError(f"{path}:{line}: malformed CSV ({e}; an unterminated quote?)") from None
    return rows


def trial_dir(study_dir: str | os.PathLike, number: int) -> Path:
    """Where the search runs trial ``number``."""
    return Path(study_dir) / RUNS / f"{number:04d}"


def run_dirs(study_dir: str | os.PathLike, row: dict) -> list[Path]:
    """Where a row's trial may have run: its ``run_dir`` (as written, or under the study folder), then its trial_dir."""
    dirs = [Path(row["run_dir"]), Path(study_dir) / row["run_dir"]] if row.get("run_dir") else []
    try:
        return [*dirs, trial_dir(study_dir, int(float(row.get("number"))))]
    except (TypeError, ValueError, OverflowError):
        return dirs


def completed(rows: list[dict]) -> list[dict]:
    """The rows of trials that completed."""
    return [r for r in rows if str(r.get("state", "")).upper().endswith("COMPLETE")]
