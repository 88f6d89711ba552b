"""The one reader of result folders for the comparison: training runs, soups, search studies and
ensembles, as table entries.

Readers tolerate what a kill or an older version leaves: a last line torn by a kill is skipped with a
warning; an unreadable ``params.json`` or soup ``summary.json`` is a warning (no settings; soups taken
from the log); a hits file that is missing, unreadable or (for a run) does not give its row's mean
recall leaves the row without an interval and a note saying why. Every entry lists the files it was
read from, so that no output is written over an input.
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
from solution.ensembles.make_ensemble import NAME as ENSEMBLE
from solution.ensembles.make_ensemble import read_ensemble
from solution.formats.hits import read_hits
from solution.formats.run_files import METRICS, PARAMS, main_valid, parse_lines, read_metrics, read_params
from solution.formats.trials import NAME as TRIALS
from solution.formats.trials import read_trials, run_dirs
from solution.retrieval.metrics import mean_recall
from solution.soups import LOG as SOUP_LOG
from solution.soups import SUMMARY as SOUP_SUMMARY
from solution.training.flags import NOT_SETTINGS

log = logging.getLogger(__name__)

SCORES = ("mean_recall", "r1", "r5", "r10")
MAX_DEPTH = 4
NO_HITS = "no per-query hits stored"


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
    hits_note: str = NO_HITS  # why there are none


def _hits(folders: Sequence[Path], rel, files: list, mr: float | None = None) -> tuple[tuple | None, str]:
    """``(hits, note)`` of the file ``rel`` names, in the first of ``folders`` holding it; hits whose
    mean recall is not ``mr`` (when given) are left out."""
    if not isinstance(rel, str) or not rel:
        return None, NO_HITS
    path = next((d / rel for d in folders if (d / rel).is_file()), None)
    if path is None:
        log.warning("%s: per-query hits %s not found: no interval for this row", folders[0], rel)
        return None, "per-query hits file missing"
    try:
        hits = read_hits(path)
    except SolutionError as e:
        log.warning("%s: no interval for this row", e)
        return None, "per-query hits unreadable"
    if mr is not None and (len(hits[0]) == 0 or mean_recall(hits[1]) != mr):
        log.warning("%s: per-query hits do not give the row's mean recall: no interval for this row", path)
        return None, "per-query hits do not match the row"
    files.append(path)
    return hits, ""


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
    return {k: v for k, v in _flat(params).items() if k.split(".")[0] not in NOT_SETTINGS}


def read_run(run_dir: Path, name: str, kind: str = "run", settings: dict | None = None) -> Entry:
    """A run's best validation of the main set (scores, step, the hits file that row names), its curve
    and its settings."""
    metrics, params = run_dir / METRICS, run_dir / PARAMS
    valid = [r for r in main_valid(read_metrics(metrics)) if isinstance(r["mean_recall"], (int, float))]
    best = max(valid, key=lambda r: r["mean_recall"]) if valid else {}
    files = [f for f in (metrics, params) if f.is_file()]
    hits, note = _hits([run_dir], best.get("hits"), files, best.get("mean_recall"))
    return Entry(
        name,
        kind,
        {k: best.get(k) for k in SCORES} if best else {},
        best.get("step"),
        settings=run_settings(run_dir) if settings is None else settings,
        curve=[(r.get("step"), r["mean_recall"]) for r in valid],
        extra={"validations": len(valid)},
        files=files,
        hits=hits,
        hits_note=note,
    )


def _json_object(path: Path) -> dict:
    """An optional JSON object file: unreadable means a warning and ``{}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        data = e
    if not isinstance(data, dict):
        log.warning("%s is not a UTF-8 JSON object (%s): soups taken from the log", path, type(data).__name__)
        return {}
    return data


def read_soup(folder: Path, name: str) -> list[Entry]:
    """One entry per soup method of the folder: the chosen soup (from ``summary.json``, else the best
    kept candidate of the log) over all queries, the score it was chosen on, its held-out score, its
    gain over the best single ingredient and that ingredient (with hits: a reference)."""
    log_file, summary_file = folder / SOUP_LOG, folder / SOUP_SUMMARY
    rows = parse_lines(log_file, log_file.read_bytes())
    summary = _json_object(summary_file) if summary_file.is_file() else {}
    files = [log_file, *([summary_file] if summary_file.is_file() else [])]
    singles = [r for r in rows if r.get("method") == "ingredient" and r.get("mean_recall") is not None]
    best_row = max(singles, key=lambda r: r["mean_recall"], default=None)
    single = summary.get("best_single") or best_row or {}
    ref_hits, _ = _hits([folder, folder.parent], single.get("hits"), files)
    reference = ref_hits and {  # the best ingredient over all queries: a reference when no single model is a row
        "name": f"best ingredient {_display(Path(str(single.get('path') or (single.get('members') or ['?'])[0])))}"
        f" of {name}",
        "mean_recall": (single.get("all") or single).get("mean_recall"),
        "hits": ref_hits,
    }
    methods = list(dict.fromkeys(str(r.get("method", "")).split("+")[0] for r in rows))
    methods = [m for m in methods if m and m not in ("ingredient", "base")]
    out = []
    for m in methods:
        lines = [r for r in rows if str(r.get("method", "")).split("+")[0] == m]
        final = (summary.get("soups") or {}).get(m)
        if final is None:  # no summary: the best kept candidate
            kept = [r for r in lines if r.get("kept") and r.get("mean_recall") is not None]
            final = max(kept, key=lambda r: r["mean_recall"]) if kept else lines[-1]
        mr, cross = final.get("mean_recall"), final.get("crossfit")
        hits, note = _hits([folder, folder.parent], final.get("hits"), files)
        settings = {"method": m, "members": len(final.get("members") or [])}
        if any("alpha" in r for r in lines):
            settings["alpha"] = final.get("alpha", 1.0)
        extra = {
            "vs_best_single": mr - best_row["mean_recall"] if mr is not None and best_row else None,
            "select_mr": mr if final.get("all") else None,  # with --select-split: the score it was chosen on
            "reference": reference,
            **({"crossfit": {k: cross.get(k) for k in ("k", "mean", "low", "high")}} if cross else {}),
        }
        report = final.get("report") or {}
        held_out = cross.get("mean") if cross and not report else report.get("mean_recall")
        scores = {k: (final.get("all") or final).get(k) for k in SCORES}  # all queries: comparable with runs
        label = name if len(methods) == 1 else f"{name}:{m}"
        curve = [(i, r.get("mean_recall"), bool(r.get("kept"))) for i, r in enumerate(lines)]
        out.append(Entry(label, "soup", scores, None, held_out, settings, curve, extra, files, hits, note))
    return out


def read_ensemble_folder(folder: Path, name: str) -> list[Entry]:
    """The ensemble (over all validation queries, the held-out part's score, its hits) and each of its
    members alone (single models: what a significance reference is made of)."""
    spec, files = read_ensemble(folder / ENSEMBLE), [folder / ENSEMBLE]
    scores, hits_files = spec.get("scores") or {}, spec.get("hits") or {}
    hits, note = _hits([folder, folder.parent], hits_files.get("ensemble"), files)
    settings = {
        "members": len(spec["members"]),
        "norm": spec.get("norm"),
        "rerank": (spec.get("rerank") or {}).get("method"),
    }
    all_, held_out = (
        {k: (scores.get("all") or {}).get(k) for k in SCORES},
        (scores.get("report") or {}).get("mean_recall"),
    )
    extra = {"select_mr": (scores.get("select") or {}).get("mean_recall")}
    out = [Entry(name, "ensemble", all_, None, held_out, settings, [], extra, files, hits, note)]
    for i, (member, alone) in enumerate(zip(spec["members"], scores.get("members") or [])):
        h, n = _hits([folder, folder.parent], hits_files.get(f"member{i}"), files)
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


def read_study(study_dir: Path, name: str) -> list[Entry]:
    """One entry per trial: its run's best validation, else the study's value; its parameters and state."""
    out = []
    for r in read_trials(study_dir / TRIALS):
        settings = {
            k[len("params_") :]: _num(v) for k, v in r.items() if k.startswith("params_") and v not in ("", None)
        }
        settings["state"] = str(r.get("state", "")).replace("TrialState.", "")
        run_dir = next((d for d in run_dirs(study_dir, r) if (d / METRICS).is_file()), None)
        tname = f"{name}/trial {r.get('number') or '?'}"
        e = read_run(run_dir, tname, "trial", settings) if run_dir else Entry(tname, "trial", {}, settings=settings)
        if not e.scores and isinstance(_num(r.get("value")), (int, float)):
            e.scores = {"mean_recall": _num(r.get("value"))}
        e.files.append(study_dir / TRIALS)
        out.append(e)
    return out


def _num(v):
    """A CSV cell as a number where it is one (whole numbers written without a point stay ints)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None if v == "" else v
    return None if math.isnan(x) else int(x) if x.is_integer() and "." not in str(v) else x


def _display(p: Path) -> str:
    rel = os.path.relpath(p)
    return rel if not rel.startswith("..") and len(rel) < len(str(p.resolve())) else str(p)


READERS = {
    METRICS: lambda d, n: [read_run(d, n)],
    SOUP_LOG: read_soup,
    TRIALS: read_study,
    ENSEMBLE: read_ensemble_folder,
}


def _walk(p: Path, depth: int) -> list[Entry]:
    if p.is_file():
        if p.name not in READERS:
            raise SolutionError(f"{p}: expected a {METRICS}, {SOUP_LOG}, {TRIALS} or {ENSEMBLE} (or a folder)")
        return READERS[p.name](p.parent, _display(p.parent))
    for file in (TRIALS, ENSEMBLE, SOUP_LOG, METRICS):  # a study's trials hold runs: the study first
        if (p / file).is_file():
            return READERS[file](p, _display(p))
    if depth >= MAX_DEPTH:
        return []
    children = sorted(c for c in p.iterdir() if c.is_dir() and c.name not in ("checkpoints", "adapters"))
    return [e for c in children for e in _walk(c, depth + 1)]


def collect(paths: Sequence[str | os.PathLike]) -> list[Entry]:
    """Entries for every run, soup, study and ensemble under ``paths`` (a folder is searched a few levels deep)."""
    entries: list[Entry] = []
    for p in map(Path, paths):
        if not p.exists():
            raise SolutionError(f"not found: {p}")
        found = _walk(p, 0)
        if not found:
            raise SolutionError(
                f"{p}: no training run ({METRICS}), soup ({SOUP_LOG}), study ({TRIALS}) or ensemble ({ENSEMBLE})"
            )
        entries.extend(found)
    return entries
