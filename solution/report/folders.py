"""The one reader of run, soup, study and ensemble folders for the comparison, as table entries. A folder that
cannot be read costs its own row (one warning saying why); a last line torn by a kill is skipped."""

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
from solution.formats.kinds import folder_kind
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
    curve: list = field(default_factory=list)  # [(step, mr)]; a soup: [(candidate, mr, label)] of those it kept
    extra: dict = field(default_factory=dict)
    files: list = field(default_factory=list)  # the files it was read from (never an output)
    hits: tuple | None = None  # (query ids [Q], hits [Q, 3] bool) of the scores, when stored
    hits_note: str = NO_HITS  # why there are none


def _hits(folders: Sequence[Path], rel, files: list, mr: float | None = None) -> tuple[tuple | None, str]:
    """``(hits, note)`` of the file ``rel`` names in the first of ``folders`` holding it (mean recall ``mr``)."""
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
    """A run's best validation of the main set (scores, step, its hits), its curve and its settings."""
    metrics, params = run_dir / METRICS, run_dir / PARAMS
    valid = [r for r in main_valid(read_metrics(metrics)) if _finite(r["mean_recall"])]
    best = max(valid, key=lambda r: r["mean_recall"]) if valid else {}
    files = [f for f in (metrics, params) if f.is_file()]
    hits, note = _hits([run_dir], best.get("hits"), files, best.get("mean_recall"))
    scores = {k: best.get(k) for k in SCORES} if best else {}
    curve = [(r.get("step"), r["mean_recall"]) for r in valid]
    settings = run_settings(run_dir) if settings is None else settings
    return Entry(name, kind, scores, best.get("step"), None, settings, curve, {}, files, hits, note)


def _summary(path: Path) -> dict:
    """A soup's optional ``summary.json``; unreadable is a warning and ``{}`` (soups then come from the log)."""
    try:
        data = json.loads(path.read_bytes()) if path.is_file() else {}
    except ValueError:  # not JSON, not UTF-8
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("soups", {}), dict):
        log.warning("%s is not a soup summary: soups taken from the log", path)
        return {}
    return data


def read_soup(folder: Path, name: str) -> list[Entry]:
    """One entry per soup method of the summary or the log: the chosen soup (else the best kept candidate of the
    log) over all queries, the score it was chosen on, its held-out score, its gain over the best single
    ingredient and that ingredient (with hits: a reference)."""
    log_file, summary_file = folder / SOUP_LOG, folder / SOUP_SUMMARY
    rows = parse_lines(log_file, log_file.read_bytes())
    summary = _summary(summary_file)
    files = [log_file, *([summary_file] if summary else [])]
    singles = [r for r in rows if r.get("method") == "ingredient" and r.get("mean_recall") is not None]
    best_row = max(singles, key=lambda r: r["mean_recall"], default=None)
    single = summary.get("best_single") or best_row or {}
    ref_hits, _ = _hits([folder, folder.parent], single.get("hits"), files)
    # the best ingredient over all queries: a reference when no single model is a row
    ref = _display(Path(str(single.get("path") or (single.get("members") or ["?"])[0])))
    ref_mr = (single.get("all") or single).get("mean_recall")
    reference = ref_hits and {"name": f"best ingredient {ref} of {name}", "mean_recall": ref_mr, "hits": ref_hits}
    soups = summary.get("soups") or {}
    methods = [*soups, *(str(r.get("method", "")).split("+")[0] for r in rows)]
    methods = [m for m in dict.fromkeys(methods) if m and m not in ("ingredient", "base")]
    if not methods:
        raise SolutionError(f"{log_file} holds no soup (cut short?)")
    out = []
    for m in methods:
        lines = [r for r in rows if str(r.get("method", "")).split("+")[0] == m]
        final = soups.get(m)
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
        kept = [(i, r) for i, r in enumerate(lines) if r.get("kept") and _finite(r.get("mean_recall"))]
        curve = [(i, r["mean_recall"], r.get("label", "")) for i, r in kept]
        out.append(Entry(label, "soup", scores, None, held_out, settings, curve, extra, files, hits, note))
    return out


def read_ensemble_folder(folder: Path, name: str) -> list[Entry]:
    """The ensemble (over all validation queries, the held-out part's score, its hits) and each of its members
    alone, named by its checkpoint (single models: what a significance reference is made of)."""
    spec, files = read_ensemble(folder / ENSEMBLE), [folder / ENSEMBLE]
    scores, hits_files = spec.get("scores") or {}, spec.get("hits") or {}
    hits, note = _hits([folder, folder.parent], hits_files.get("ensemble"), files)
    settings = {"members": len(spec["members"]), "norm": spec["norm"], "rerank": spec["rerank"]["method"]}
    all_ = {k: (scores.get("all") or {}).get(k) for k in SCORES}
    held_out = (scores.get("report") or {}).get("mean_recall")
    extra = {"select_mr": (scores.get("select") or {}).get("mean_recall")}
    out = [Entry(name, "ensemble", all_, None, held_out, settings, [], extra, files, hits, note)]
    for i, (member, alone) in enumerate(zip(spec["members"], scores.get("members") or [])):
        h, n = _hits([folder, folder.parent], hits_files.get(f"member{i}"), files)
        alone = {k: (alone.get("all") or {}).get(k) for k in SCORES}
        settings = {"ensemble": name, "weight": spec["weights"][i], "arch": member.get("arch")}
        out.append(
            Entry(_display(Path(str(member["path"]))), "member", alone, None, None, settings, [], {}, files, h, n)
        )
    return out


def read_study(study_dir: Path, name: str) -> list[Entry]:
    """One entry per trial: its run's best validation, else the study's value; its parameters and state."""
    out = []
    for r in read_trials(study_dir / TRIALS):
        settings = {k[7:]: _num(v) for k, v in r.items() if k.startswith("params_") and v not in ("", None)}
        settings["state"] = str(r.get("state", "")).replace("TrialState.", "")
        run_dir = next((d for d in run_dirs(study_dir, r) if (d / METRICS).is_file()), None)
        tname = f"{name}/trial {r.get('number') or '?'}"
        e = read_run(run_dir, tname, "trial", settings) if run_dir else Entry(tname, "trial", {}, settings=settings)
        if not e.scores and _finite(_num(r.get("value"))):
            e.scores = {"mean_recall": _num(r.get("value"))}
        e.files.append(study_dir / TRIALS)
        out.append(e)
    return out


def _num(v):
    """A CSV cell as a number where it is one (whole numbers without a point stay ints); None if empty or not finite."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None if v == "" else v
    return None if not math.isfinite(x) else int(x) if x.is_integer() and "." not in str(v) else x


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _display(p: Path) -> str:
    rel = os.path.relpath(p)
    return rel if not rel.startswith("..") and len(rel) < len(str(p.resolve())) else str(p)


READERS = {  # kind -> (the file that marks it, its reader)
    "run": (METRICS, lambda d, n: [read_run(d, n)]),
    "soup": (SOUP_LOG, read_soup),
    "study": (TRIALS, read_study),
    "ensemble": (ENSEMBLE, read_ensemble_folder),
}
FILES = {file: kind for kind, (file, _) in READERS.items()}


def _read(folder: Path, kind: str) -> list[Entry]:
    try:
        return READERS[kind][1](folder, _display(folder))
    except (SolutionError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        why = e if isinstance(e, (SolutionError, OSError)) else f"unexpected content ({type(e).__name__}: {e})"
        log.warning("%s (a %s folder) left out of the table: %s", folder, kind, why)
        return []


def _walk(p: Path, depth: int) -> list[Entry]:
    """The entries of ``p``: read as its kind where it has the kind's file, else from its sub-folders."""
    if p.is_file():
        if p.name not in FILES:
            raise SolutionError(f"{p}: expected a {METRICS}, {SOUP_LOG}, {TRIALS} or {ENSEMBLE} (or a folder)")
        return _read(p.parent, FILES[p.name])
    kind = folder_kind(p)
    if kind in READERS and (p / READERS[kind][0]).is_file():
        return _read(p, kind)
    if depth >= MAX_DEPTH or kind in ("lmdb", "data"):
        return []
    children = sorted(c for c in p.iterdir() if c.is_dir() and c.name not in ("checkpoints", "adapters"))
    return [e for c in children for e in _walk(c, depth + 1)]


def collect(paths: Sequence[str | os.PathLike]) -> list[Entry]:
    """Entries for every run, soup, study and ensemble under ``paths`` (folders searched a few levels deep)."""
    entries: list[Entry] = []
    for p in map(Path, paths):
        if not p.exists():
            raise SolutionError(f"not found: {p}")
        entries.extend(_walk(p, 0))
    if not entries:
        where = ", ".join(map(str, paths))
        raise SolutionError(f"nothing to compare in {where}: no readable {METRICS}, {SOUP_LOG}, {TRIALS}, {ENSEMBLE}")
    return entries
