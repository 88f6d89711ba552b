"""The one reader of result folders: training runs, soups and search studies, as table entries.

- a training run directory: ``metrics.jsonl`` (:func:`solution.formats.run_files.read_metrics`: a last
  line torn by a kill is skipped with a warning), ``params.json``
  (:func:`solution.formats.run_files.read_params`; unreadable means a warning and no settings) and the
  per-query hits file its best main-set validation row names (``"hits"``, relative to the run;
  kept only when their mean recall is that row's);
- a soup folder: ``soup_log.jsonl`` (the ingredients, then one line per candidate) and, when
  present, ``summary.json`` (the chosen soup per method; unreadable means a warning and the soups
  are taken from the log); the per-query hits files they name (:mod:`solution.formats.hits`,
  relative to the soup folder or the folder above it), each soup's and the best ingredient's;
- a search study folder: ``trials.csv`` (:func:`solution.formats.trials.read_trials`) and the
  trials' run directories (``run_dir``, else ``trials/NNNN/``).

:func:`collect` finds them under the given paths (a folder is searched a few levels deep). Every
entry lists the files it was read from, so that no output is written over an input.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from solution.common import SolutionError
from solution.formats.hits import read_hits
from solution.formats.run_files import METRICS, PARAMS, main_valid, parse_lines, read_metrics, read_params
from solution.formats.trials import NAME as TRIALS_CSV
from solution.formats.trials import read_trials
from solution.retrieval.metrics import mean_recall

log = logging.getLogger(__name__)

SOUP_LOG, SOUP_SUMMARY = "soup_log.jsonl", "summary.json"
ENSEMBLE = "ensemble.json"
SCORES = ("mean_recall", "r1", "r5", "r10")
# Settings that name places or switch logging: never "the difference" between two runs.
IGNORED_PARAMS = {
    "typed",
    "flag_changes",
    "config",
    "logs",
    "name",
    "no_plot",
    "no_progress",
    "log_interval",
    "num_workers",
    "valid_num_workers",
    "device",
    "model_config",
    "extra_val_data",
    "train_data",
    "val_data",
    "valid_batch_size",
    "debug",
    "no_auto_resume",
    "report_training_batch_acc",
}
MAX_DEPTH = 4


@dataclass
class Entry:
    name: str
    kind: str  # run | trial | soup | ensemble | member (of an ensemble)
    scores: dict  # mean_recall, r1, r5, r10 (may be missing)
    step: int | None = None
    held_out: float | None = None
    settings: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)  # run/trial: [(step, mr)]; soup: [(round, mr, kept)]
    extra: dict = field(default_factory=dict)
    files: list = field(default_factory=list)  # the files it was read from (never an output)
    hits: tuple | None = None  # (query ids [Q], hits [Q, 3] bool) of the scores, when stored
    hits_note: str = "no per-query hits stored"  # why there are none


def _hits(folder: Path, rel, files: list) -> tuple[tuple | None, str]:
    """The hits file ``rel`` names (beside ``folder``'s soup, or the one above it): ``(hits, note)``."""
    if not rel:
        return None, "no per-query hits stored"
    for base in (folder, folder.parent):
        path = base / str(rel)
        if path.is_file():
            try:
                hits = read_hits(path)
            except SolutionError as e:
                log.warning("%s: no interval for this row", e)
                return None, "per-query hits unreadable"
            files.append(path)
            return hits, ""
    log.warning("%s: per-query hits %s not found: no interval for this row", folder, rel)
    return None, "per-query hits file missing"


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


def run_settings(run_dir: Path) -> dict:
    """A run's ``params.json`` flattened (``a.b`` keys), without the settings that name places."""
    try:
        params = read_params(run_dir) or {}
    except SolutionError as e:
        log.warning("%s: settings left out", e)
        params = {}
    return {k: v for k, v in _flat(params).items() if k.split(".")[0] not in IGNORED_PARAMS}


def _run_hits(run_dir: Path, best: dict | None, files: list) -> tuple[tuple | None, str]:
    """The hits file the run's best row names (relative to the run): ``(hits, note)``; hits whose mean
    recall is not the row's (a file left by a validation the resumed run dropped) are left out."""
    rel = best.get("hits") if best else None
    if not isinstance(rel, str) or not rel:
        return None, "no per-query hits stored"
    path = run_dir / rel
    if not path.is_file():
        log.warning("%s: per-query hits %s not found: no interval for this row", run_dir, rel)
        return None, "per-query hits file missing"
    try:
        hits = read_hits(path)
    except SolutionError as e:
        log.warning("%s: no interval for this row", e)
        return None, "per-query hits unreadable"
    if len(hits[0]) == 0 or mean_recall(hits[1]) != best["mean_recall"]:
        log.warning("%s: per-query hits do not give the row's mean recall: no interval for this row", path)
        return None, "per-query hits do not match the row"
    files.append(path)
    return hits, ""


def read_run(run_dir: Path, name: str, kind: str = "run", settings: dict | None = None) -> Entry:
    """A run's best validation of the main set (scores, step and per-query hits when that row names
    them), its curve and its settings."""
    metrics, params = run_dir / METRICS, run_dir / PARAMS
    valid = [r for r in main_valid(read_metrics(metrics)) if isinstance(r["mean_recall"], (int, float))]
    best = max(valid, key=lambda r: r["mean_recall"]) if valid else None
    if settings is None:
        settings = run_settings(run_dir)
    files = [f for f in (metrics, params) if f.is_file()]
    hits, note = _run_hits(run_dir, best, files)
    return Entry(
        name,
        kind,
        {k: best.get(k) for k in SCORES} if best else {},
        best.get("step") if best else None,
        settings=settings,
        curve=[(r.get("step"), r["mean_recall"]) for r in valid],
        extra={"validations": len(valid)},
        files=files,
        hits=hits,
        hits_note=note,
    )


def _soup_methods(rows: list[dict]) -> list[str]:
    methods = []
    for r in rows:
        m = str(r.get("method", "")).split("+")[0]
        if m and m not in ("ingredient", "base") and m not in methods:
            methods.append(m)
    return methods


def read_soup(folder: Path, name: str) -> list[Entry]:
    """One entry per soup method of the folder: the chosen soup (from ``summary.json``, else the best
    kept candidate of the log), its held-out score, and its gain over the best single ingredient."""
    log_file, summary_file = folder / SOUP_LOG, folder / SOUP_SUMMARY
    rows = parse_lines(log_file, log_file.read_bytes())
    summary = _json_object(summary_file, "soups taken from the log") if summary_file.is_file() else {}
    files = [log_file, *([summary_file] if summary_file.is_file() else [])]
    singles = [r for r in rows if r.get("method") == "ingredient" and r.get("mean_recall") is not None]
    best_single = max((r["mean_recall"] for r in singles), default=None)
    best_row = max(singles, key=lambda r: r["mean_recall"], default=None)
    ref_hits, _ = _hits(folder, (summary.get("best_single") or best_row or {}).get("hits"), files)
    reference = None
    if ref_hits is not None:  # the best ingredient, over all queries: a reference when no single model is a row
        single = summary.get("best_single") or best_row
        path = Path(str(single.get("path") or (single.get("members") or ["?"])[0]))
        reference = {
            "name": f"best ingredient {_display(path)} of {name}",
            "mean_recall": (single.get("all") or single).get("mean_recall"),
            "hits": ref_hits,
        }
    methods = _soup_methods(rows)
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
        settings = {
            "method": m,
            "members": len(final.get("members") or []),
            "alpha": final.get("alpha", 1.0) if any("alpha" in r for r in lines) else None,
        }
        extra = {
            "vs_best_single": (mr - best_single) if mr is not None and best_single is not None else None,
            "select_mr": mr if final.get("all") else None,
            "reference": reference,
        }
        cross = final.get("crossfit")
        if cross:  # --folds: the held-out estimate is the cross-fit mean (the interval beside it)
            extra["crossfit"] = {k: cross.get(k) for k in ("k", "mean", "low", "high")}
        hits, note = _hits(folder, final.get("hits"), files)
        held_out = report.get("mean_recall") if report or not cross else cross.get("mean")
        out.append(
            Entry(
                name if len(methods) == 1 else f"{name}:{m}",
                "soup",
                {k: scores.get(k) for k in SCORES},
                None,
                held_out,
                {k: v for k, v in settings.items() if v is not None},
                curve,
                extra,
                files,
                hits,
                note,
            )
        )
    return out


def read_ensemble_folder(folder: Path, name: str) -> list[Entry]:
    """The ensemble (scores over all validation queries, the held-out part's, its hits) and each of its
    members alone (single models: what a significance reference is made of)."""
    from solution.ensembles.spec import read_ensemble

    spec_file = folder / ENSEMBLE
    spec, files = read_ensemble(spec_file), [spec_file]
    scores, hits_files = spec.get("scores") or {}, spec.get("hits") or {}
    hits, note = _hits(folder, hits_files.get("ensemble"), files)
    settings = {
        "members": len(spec["members"]),
        "norm": spec.get("norm"),
        "rerank": (spec.get("rerank") or {}).get("method"),
    }
    out = [
        Entry(
            name,
            "ensemble",
            {k: (scores.get("all") or {}).get(k) for k in SCORES},
            None,
            (scores.get("report") or {}).get("mean_recall"),
            settings,
            [],
            {"select_mr": (scores.get("select") or {}).get("mean_recall")},
            files,
            hits,
            note,
        )
    ]
    for i, (member, alone) in enumerate(zip(spec["members"], scores.get("members") or [])):
        h, n = _hits(folder, hits_files.get(f"member{i}"), files)
        out.append(
            Entry(
                f"{name}/member {i} {_display(Path(str(member['path'])))}",
                "member",
                {k: (alone.get("all") or {}).get(k) for k in SCORES},
                settings={"weight": spec["weights"][i], "arch": member.get("arch")},
                files=files,
                hits=h,
                hits_note=n,
            )
        )
    return out


def _trial_run_dir(study_dir: Path, row: dict) -> Path | None:
    """The trial's run directory: its ``run_dir`` column, else ``trials/NNNN`` (one holding metrics)."""
    n = _num(row.get("number"))
    own = [study_dir / "trials" / f"{int(n):04d}"] if isinstance(n, (int, float)) and float(n).is_integer() else []
    for c in ([Path(row["run_dir"])] if row.get("run_dir") else []) + own:
        if (c / METRICS).is_file():
            return c
    return None


def read_study(study_dir: Path, name: str) -> list[Entry]:
    """One entry per trial: its run's best validation, else the study's value; its parameters and state."""
    table = study_dir / TRIALS_CSV
    out = []
    for r in read_trials(table):
        number = r.get("number") or "?"
        settings = {
            k[len("params_") :]: _num(v) for k, v in r.items() if k.startswith("params_") and v not in ("", None)
        }
        settings["state"] = str(r.get("state", "")).replace("TrialState.", "")
        run_dir = _trial_run_dir(study_dir, r)
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
    """A CSV cell as a number where it is one (whole numbers written without a point stay ints)."""
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return v
    if math.isnan(x):
        return None
    return int(x) if x.is_integer() and "." not in str(v) else x


def collect(paths: Sequence[str | os.PathLike]) -> list[Entry]:
    """Entries for every run, soup and study under ``paths`` (errors name the path)."""
    entries: list[Entry] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise SolutionError(f"not found: {p}")
        found = _walk(p, 0)
        if not found:
            raise SolutionError(
                f"{p}: no training run ({METRICS}), soup ({SOUP_LOG}), study ({TRIALS_CSV}) or ensemble ({ENSEMBLE})"
            )
        entries.extend(found)
    return entries


def _display(p: Path) -> str:
    rel = os.path.relpath(p)
    return rel if not rel.startswith("..") and len(rel) < len(str(p.resolve())) else str(p)


def _walk(p: Path, depth: int) -> list[Entry]:
    if p.is_file():
        if p.name == METRICS:
            return [read_run(p.parent, _display(p.parent))]
        if p.name == SOUP_LOG:
            return read_soup(p.parent, _display(p.parent))
        if p.name == TRIALS_CSV:
            return read_study(p.parent, _display(p.parent))
        if p.name == ENSEMBLE:
            return read_ensemble_folder(p.parent, _display(p.parent))
        raise SolutionError(f"{p}: expected a {METRICS}, {SOUP_LOG}, {TRIALS_CSV} or {ENSEMBLE} (or a folder)")
    if (p / TRIALS_CSV).is_file():
        return read_study(p, _display(p))
    if (p / ENSEMBLE).is_file():
        return read_ensemble_folder(p, _display(p))
    if (p / SOUP_LOG).is_file():
        return read_soup(p, _display(p))
    if (p / METRICS).is_file():
        return [read_run(p, _display(p))]
    if depth >= MAX_DEPTH:
        return []
    out = []
    for child in sorted(c for c in p.iterdir() if c.is_dir() and c.name not in ("checkpoints", "adapters")):
        out.extend(_walk(child, depth + 1))
    return out
