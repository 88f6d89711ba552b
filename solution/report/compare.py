"""Compare validation results of training runs, soups and search studies: one table and one plot.

``python -m solution.compare logs/run_a logs/run_b soups/NAME search/STUDY [--csv] [--output FILE]
[--plot compare.png]``. Each PATH may be:

- a training run directory (``metrics.jsonl`` + ``params.json``) or its ``metrics.jsonl``;
- a soup folder (``soup_log.jsonl``, + ``summary.json``) or its ``soup_log.jsonl``; a folder made by
  several methods at once holds one soup folder per method;
- a search study folder (``trials.csv`` + ``trials/NNNN/`` run directories): one row per trial;
- any other folder: searched (a few levels deep) for the above.

One row per run / soup / trial: best validation mean recall and R@1/5/10 (runs: the best
validation of the main set; trials: their run's best, else the study's value; soups: the chosen
soup over all the validation queries, and with ``--select-split`` the score it was chosen on in
``select_mr`` and the other part's in ``held_out_mr``, the honest one; ``vs_best_single`` is the
soup minus its best ingredient on the selection part), the step, and the settings that differ
between rows (``--params`` to choose them). Sorted by mean recall, the best marked ``*``. The PNG shows mean
recall per run over steps and per soup over rounds (candidates as dots, the kept path as a line).
``--output`` and ``--plot`` that are folders, sit under a file or are one of the files read are
refused before anything is written; so are malformed inputs (non-UTF-8 or non-JSON lines, a broken
``trials.csv``), naming file and line.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from solution.common import SolutionError, atomic_path, check_output, read_jsonl, run_cli
from solution.plots import save_png

log = logging.getLogger(__name__)

SCORES = ("mean_recall", "r1", "r5", "r10")
# Settings that name places or switch logging: never "the difference" between two runs.
IGNORED_PARAMS = {"config", "logs", "name", "no_plot", "no_progress", "log_interval", "num_workers",
                  "valid_num_workers", "device", "model_config", "extra_val_data", "train_data", "val_data",
                  "valid_batch_size", "debug", "no_auto_resume", "report_training_batch_acc"}
MAX_AUTO_PARAMS = 8
MAX_DEPTH = 4


@dataclass
class Entry:
    name: str
    kind: str  # run | trial | soup
    scores: dict  # mean_recall, r1, r5, r10 (may be missing)
    step: int | None = None
    held_out: float | None = None
    settings: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)  # run/trial: [(step, mr)]; soup: [(round, mr, kept)]
    extra: dict = field(default_factory=dict)
    files: list = field(default_factory=list)  # the files it was read from (never an output)


# ---------------------------------------------------------------- readers


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV file with a header line (``trials.csv``) as dicts.

    Non-UTF-8 bytes, malformed CSV (an unterminated quote swallowing the rest of the file, a
    stray quote) and a row with more fields than the header are one :class:`SolutionError`
    naming the file and line.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SolutionError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows, line = [], 1
    try:
        if reader.fieldnames is None:
            return []
        line = reader.line_num + 1  # where the next row starts (an unterminated quote runs on from there)
        for row in reader:
            if None in row:
                raise SolutionError(f"{path}:{line}: more fields than the header names")
            rows.append(row)
            line = reader.line_num + 1
    except csv.Error as e:
        raise SolutionError(f"{path}:{line}: malformed CSV ({e}; an unterminated quote?)") from None
    return rows


def _records(path: Path) -> list[dict]:
    """A JSON-lines file whose lines are all JSON objects (one clear error otherwise)."""
    rows = read_jsonl(path)
    odd = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if odd is not None:
        raise SolutionError(f"{path}: record {odd} is a {type(rows[odd - 1]).__name__}, not a JSON object")
    return rows


def _json_object(path: Path, what: str) -> dict:
    """A JSON object file that is optional to the table: unreadable means a warning and ``{}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s is not valid UTF-8 JSON (%s): %s", path, type(e).__name__, what)
        return {}
    if not isinstance(data, dict):
        log.warning("%s holds a %s, not a JSON object: %s", path, type(data).__name__, what)
        return {}
    return data


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def _main_valid(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "valid" and r.get("set", "valid") == "valid"
            and isinstance(r.get("mean_recall"), (int, float))]


def read_run(run_dir: Path, name: str, kind: str = "run", settings: dict | None = None) -> Entry:
    metrics, params = run_dir / "metrics.jsonl", run_dir / "params.json"
    rows = _records(metrics) if metrics.is_file() else []
    valid = _main_valid(rows)
    best = max(valid, key=lambda r: r["mean_recall"]) if valid else None
    if settings is None:
        settings = _flat(_json_object(params, "settings left out")) if params.is_file() else {}
        settings = {k: v for k, v in settings.items() if k.split(".")[0] not in IGNORED_PARAMS}
    return Entry(name, kind, {k: best.get(k) for k in SCORES} if best else {}, best.get("step") if best else None,
                 settings=settings, curve=[(r.get("step"), r["mean_recall"]) for r in valid],
                 extra={"validations": len(valid)}, files=[f for f in (metrics, params) if f.is_file()])


def read_soup(folder: Path, name: str) -> list[Entry]:
    log_file, summary_file = folder / "soup_log.jsonl", folder / "summary.json"
    rows = _records(log_file)
    summary = _json_object(summary_file, "soups taken from the log") if summary_file.is_file() else {}
    files = [log_file, *([summary_file] if summary_file.is_file() else [])]
    singles = [r for r in rows if r.get("method") == "ingredient" and r.get("mean_recall") is not None]
    best_single = max((r["mean_recall"] for r in singles), default=None)
    methods = []
    for r in rows:
        m = str(r.get("method", "")).split("+")[0]
        if m and m not in ("ingredient", "base") and m not in methods:
            methods.append(m)
    out = []
    for m in methods:
        lines = [r for r in rows if str(r.get("method", "")).split("+")[0] == m]
        final = (summary.get("soups") or {}).get(m)
        if final is None:  # no summary: the best kept candidate
            kept = [r for r in lines if r.get("kept") and r.get("mean_recall") is not None]
            final = max(kept, key=lambda r: r["mean_recall"]) if kept else (lines[-1] if lines else {})
        report = final.get("report") or {}
        # With --select-split: the table's scores are over all the validation queries (comparable with
        # runs); the score the soup was chosen on and the held-out part's go in their own columns.
        scores = final.get("all") or final
        mr = final.get("mean_recall")
        curve = [(i, r.get("mean_recall"), bool(r.get("kept"))) for i, r in enumerate(lines)]
        settings = {"method": m, "members": len(final.get("members") or []),
                    "alpha": final.get("alpha", 1.0) if any("alpha" in r for r in lines) else None}
        extra = {"vs_best_single": (mr - best_single) if mr is not None and best_single is not None else None,
                 "select_mr": mr if final.get("all") else None}
        out.append(Entry(name if len(methods) == 1 else f"{name}:{m}", "soup", {k: scores.get(k) for k in SCORES},
                         None, report.get("mean_recall"), {k: v for k, v in settings.items() if v is not None},
                         curve, extra, files))
    return out


def read_study(study_dir: Path, name: str) -> list[Entry]:
    table = study_dir / "trials.csv"
    out = []
    for r in read_csv(table):
        number = r.get("number") or "?"
        settings = {k[len("params_"):]: _num(v) for k, v in r.items() if k.startswith("params_") and v not in ("", None)}
        settings["state"] = str(r.get("state", "")).replace("TrialState.", "")
        run_dir = None
        n = _num(number)
        own = [study_dir / "trials" / f"{int(n):04d}"] if isinstance(n, (int, float)) and float(n).is_integer() else []
        for c in ([Path(r["run_dir"])] if r.get("run_dir") else []) + own:
            if (c / "metrics.jsonl").is_file():
                run_dir = c
                break
        tname = f"{name}/trial {number}"
        if run_dir is not None:
            e = read_run(run_dir, tname, "trial", settings)
        else:
            e = Entry(tname, "trial", {}, settings=settings)
        if not e.scores and isinstance(_num(r.get("value")), (int, float)):
            e.scores = {"mean_recall": _num(r.get("value"))}
        e.files.append(table)
        out.append(e)
    return out


def _num(v):
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return v
    if math.isnan(x):
        return None
    return int(x) if x.is_integer() and "." not in str(v) else x


def collect(paths: Sequence[str]) -> list[Entry]:
    """Entries for every run, soup and study under ``paths`` (errors name the path)."""
    entries: list[Entry] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise SolutionError(f"not found: {p}")
        found = _walk(p, 0)
        if not found:
            raise SolutionError(f"{p}: no training run (metrics.jsonl), soup (soup_log.jsonl) or study (trials.csv)")
        entries.extend(found)
    return entries


def _display(p: Path) -> str:
    rel = os.path.relpath(p)
    return rel if not rel.startswith("..") and len(rel) < len(str(p.resolve())) else str(p)


def _walk(p: Path, depth: int) -> list[Entry]:
    if p.is_file():
        if p.name == "metrics.jsonl":
            return [read_run(p.parent, _display(p.parent))]
        if p.name == "soup_log.jsonl":
            return read_soup(p.parent, _display(p.parent))
        if p.name == "trials.csv":
            return read_study(p.parent, _display(p.parent))
        raise SolutionError(f"{p}: expected a metrics.jsonl, soup_log.jsonl or trials.csv (or a folder)")
    if (p / "trials.csv").is_file():
        return read_study(p, _display(p))
    if (p / "soup_log.jsonl").is_file():
        return read_soup(p, _display(p))
    if (p / "metrics.jsonl").is_file():
        return [read_run(p, _display(p))]
    if depth >= MAX_DEPTH:
        return []
    out = []
    for child in sorted(c for c in p.iterdir() if c.is_dir() and c.name not in ("checkpoints", "adapters")):
        out.extend(_walk(child, depth + 1))
    return out


# ---------------------------------------------------------------- table


def table(entries: Sequence[Entry], params: Sequence[str] | None = None) -> pd.DataFrame:
    """The comparison table, best first; ``best`` is ``*`` on the top row."""
    if params is None:  # the settings that differ between rows
        keys: list[str] = ["method", "members", "alpha"]  # soups' own settings first
        for e in entries:
            keys.extend(k for k in e.settings if k not in keys)
        always = {"method", "members"} if any(e.kind == "soup" for e in entries) else set()
        varying = [k for k in keys  # among the rows that have it: soups have no lr, runs no method
                   if k in always or len({json.dumps(e.settings[k], default=str) for e in entries if k in e.settings}) > 1]
        params = varying[:MAX_AUTO_PARAMS]
    rows = []
    for e in entries:
        row = {"name": e.name, "kind": e.kind, **{k: e.scores.get(k) for k in SCORES},
               "select_mr": e.extra.get("select_mr"), "held_out_mr": e.held_out, "step": e.step,
               "vs_best_single": e.extra.get("vs_best_single")}
        row.update({k: e.settings.get(k) for k in params})
        rows.append(row)
    df = pd.DataFrame(rows, columns=["name", "kind", *SCORES, "select_mr", "held_out_mr", "step", "vs_best_single",
                                     *params])
    for col in ("select_mr", "held_out_mr", "step", "vs_best_single"):
        if col in df and df[col].isna().all():
            df = df.drop(columns=col)
    for col in df.columns:  # whole numbers stay whole (pandas would make them floats beside a gap)
        vals = df[col].dropna()
        if col not in (*SCORES, "select_mr", "held_out_mr", "vs_best_single") and len(vals) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in vals):
            df[col] = df[col].astype("Int64")
    df = df.sort_values("mean_recall", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    df.insert(0, "best", ["*" if i == 0 and pd.notna(df.loc[0, "mean_recall"]) else "" for i in range(len(df))])
    return df


def to_markdown(df: pd.DataFrame) -> str:
    percent = {*SCORES, "select_mr", "held_out_mr", "vs_best_single"}

    def cell(v, col: str) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            if col in percent:
                return f"{v:.2f}"
            return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(cell(r[c], c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plot


def plot(entries: Sequence[Entry], path: str | os.PathLike, max_lines: int = 20) -> Path | None:
    """Mean recall per run over steps (left) and per soup over rounds (right), atomically."""
    runs = [e for e in entries if e.kind in ("run", "trial") and e.curve]
    soups = [e for e in entries if e.kind == "soup" and e.curve]
    if not runs and not soups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [x for x in (("runs", runs), ("soups", soups)) if x[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (kind, items) in zip(axes[0], panels):
        items = sorted(items, key=lambda e: -(e.scores.get("mean_recall") or -1))[:max_lines]
        for e in items:
            if kind == "runs":
                ax.plot([s for s, _ in e.curve], [m for _, m in e.curve], "o-", ms=3, label=e.name)
            else:
                xs = [i for i, m, _ in e.curve if m is not None]
                line = ax.plot(xs, [m for _, m, _ in e.curve if m is not None], "o", ms=4, alpha=0.5)[0]
                kept = [(i, m) for i, m, k in e.curve if k and m is not None]
                ax.plot([i for i, _ in kept], [m for _, m in kept], "-", color=line.get_color(), label=e.name)
        ax.set_xlabel("step" if kind == "runs" else "candidate (rounds, then interpolation)")
        ax.set_ylabel("mean recall (%)")
        ax.set_title(f"{kind}: validation mean recall")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path, dpi=90)


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m solution.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="run dirs, soup dirs, study dirs, or folders holding them")
    p.add_argument("--csv", action="store_true", help="CSV instead of a markdown table")
    p.add_argument("--output", metavar="FILE", help="also write the table here")
    p.add_argument("--plot", metavar="PNG", default="compare.png", help="where to draw the curves")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--params", metavar="KEYS", help="comma-separated settings to show (default: those that differ)")
    args = p.parse_args(argv)

    entries = collect(args.paths)
    inputs = [f for e in entries for f in e.files]
    if args.output:  # before anything is written: never over an input, nor a folder
        check_output(args.output, inputs=inputs, what="--output")
    if not args.no_plot:
        check_output(args.plot, inputs=[*inputs, args.output], what="--plot")
    df = table(entries, [k.strip() for k in args.params.split(",") if k.strip()] if args.params else None)
    text = df.to_csv(index=False) if args.csv else to_markdown(df)
    if args.output:
        with atomic_path(args.output) as tmp:
            tmp.write_text(text, encoding="utf-8")
    if not args.no_plot and plot(entries, args.plot):
        log.info("wrote %s", args.plot)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    sys.exit(run_cli(main))
