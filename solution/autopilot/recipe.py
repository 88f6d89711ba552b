"""A pipeline recipe (YAML): the data, the models to train, the search, soups and ensembles, and what to submit.

Wherever a run is described, its keys are the trainer's own flag names (as ``train_clip.sh`` takes them).
Every problem is one error naming the file and key, found before any work starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from solution.common import SolutionError, read_yaml_mapping

TOP = set("data out device threads nproc seed folds train starts runs search soups ensembles submit".split())
TOP |= {"prefer_simpler", "test_answers"}
SEARCH = {"config", "start", "n_trials", "top", "set", "storage", "gpus_per_trial"}
SOUPS = {"methods", "members", "interpolate_with", "alphas"}
ENSEMBLE = {"name", "members", "norm", "rerank", "flip", "bank"}
KINDS = ("single", "soup", "ensemble")  # simplest first


@dataclasses.dataclass(frozen=True)
class Model:
    """A model the recipe trains (``flags``) from ``start`` (a start's name, or None: from scratch), or a given
    ``checkpoint``; ``data`` is another MUGE folder to train on (a start on general data)."""

    name: str
    flags: dict
    start: str | None = None
    checkpoint: str | None = None
    data: str | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    source: Path
    data: Path
    out: Path
    device: str
    threads: int
    nproc: int  # processes per training run (torchrun when > 1)
    seed: int
    folds: int
    train: dict
    starts: dict  # name -> Model
    runs: dict  # name -> Model
    search: dict | None
    soups: dict | None
    ensembles: list
    submit: str
    prefer_simpler: bool
    test_answers: Path | None

    def where(self, key: str) -> str:
        return f"{self.source}: {key}"


def _mapping(value, where: str, allowed: set | None = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SolutionError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(set(map(str, value)) - allowed) if allowed is not None else []
    if unknown:
        sep = " " if where.endswith(":") else "."
        raise SolutionError(f"{where}{sep}{unknown[0]}: unknown key (known: {', '.join(sorted(allowed))})")
    return {str(k): v for k, v in value.items()}


def _set(data: dict, assignment: str) -> None:
    """``--set a.b.c=VALUE`` (VALUE read as YAML) into the recipe's mapping."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise SolutionError(f"--set expects KEY=VALUE, got {assignment!r}")
    node, parts = data, key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SolutionError(f"--set {key}: {p} is not a mapping")
    node[parts[-1]] = yaml.safe_load(raw)


def _models(raw, where: str, section: str) -> dict[str, Model]:
    out = {}
    for name, spec in _mapping(raw, where).items():
        w = f"{where}.{name}"
        spec = dict(_mapping(spec, w))
        if section == "starts" and "checkpoint" in spec:
            if set(spec) - {"checkpoint"}:
                raise SolutionError(f"{w}: a start is either a checkpoint or trained (flags), not both")
            out[name] = Model(name, {}, checkpoint=str(spec["checkpoint"]))
            continue
        start = spec.pop("start", None) if section == "runs" else None
        data = spec.pop("data", None) if section == "starts" else None
        out[name] = Model(name, spec, start=start, data=data)
    return out


def load_recipe(path, *, data=None, out=None, sets=()) -> Recipe:
    """The recipe in ``path`` with ``--data``/``--out``/``--set`` applied, checked."""
    path = Path(path)
    raw = read_yaml_mapping(path, "recipe")
    for s in sets:
        _set(raw, s)
    raw = _mapping(raw, f"{path}:", TOP)
    w = str(path)
    if data is None and raw.get("data") is None:
        raise SolutionError(f"{w}: data: no data folder (give data: in the recipe or --data)")
    starts = _models(raw.get("starts"), f"{w}: starts", "starts")
    runs = _models(raw.get("runs"), f"{w}: runs", "runs")
    for name, run in runs.items():
        if run.start is not None and run.start not in starts:
            raise SolutionError(f"{w}: runs.{name}.start: no start named {run.start!r}")
    search = _mapping(raw.get("search"), f"{w}: search", SEARCH) or None
    if search is not None:
        if "config" not in search:
            raise SolutionError(f"{w}: search.config: the search config YAML is required")
        if search.get("start") is not None and search["start"] not in starts:
            raise SolutionError(f"{w}: search.start: no start named {search['start']!r}")
    soups = _mapping(raw.get("soups"), f"{w}: soups", SOUPS) or None
    ensembles = []
    for i, e in enumerate(raw.get("ensembles") or []):
        e = _mapping(e, f"{w}: ensembles[{i}]", ENSEMBLE)
        if "name" not in e:
            raise SolutionError(f"{w}: ensembles[{i}].name: every ensemble needs a name")
        ensembles.append(e)
    recipe = Recipe(
        source=path,
        data=Path(data if data is not None else raw["data"]),
        out=Path(out if out is not None else raw.get("out") or "runs/pipeline"),
        device=str(raw.get("device") or "auto"),
        threads=int(raw.get("threads") or 0),
        nproc=int(raw.get("nproc") or 1),
        seed=int(raw.get("seed") or 0),
        folds=int(raw.get("folds") or 5),
        train=_mapping(raw.get("train"), f"{w}: train"),
        starts=starts,
        runs=runs,
        search=search,
        soups=soups,
        ensembles=ensembles,
        submit=str(raw.get("submit") or "best"),
        prefer_simpler=bool(raw.get("prefer_simpler", False)),
        test_answers=Path(raw["test_answers"]) if raw.get("test_answers") else None,
    )
    if recipe.folds < 2:
        raise SolutionError(f"{w}: folds: cross-fitting needs at least 2 folds, got {recipe.folds}")
    _check_names(recipe)
    return recipe


def candidate_names(recipe: Recipe) -> set[str]:
    """The candidates a recipe will produce, as far as they are known before training (trials are not)."""
    names = {n for n, m in recipe.starts.items() if m.checkpoint is None} | set(recipe.runs)
    names |= {f"soup-{m}" for m in (recipe.soups or {}).get("methods", [])}
    return names | {e["name"] for e in recipe.ensembles}


def _check_names(recipe: Recipe) -> None:
    names = candidate_names(recipe)
    w = recipe.where
    pool = set(recipe.starts) | set(recipe.runs) | {"search"}
    for m in (recipe.soups or {}).get("members", []):
        if m not in pool:
            raise SolutionError(f"{w('soups.members')}: {m!r} is neither a start, a run nor 'search'")
    for e in recipe.ensembles:
        members = e.get("members", "singles")
        if isinstance(members, list):
            bad = [m for m in members if m not in names]
            if bad:
                raise SolutionError(f"{w('ensembles')}: {e['name']}.members: no candidate named {bad[0]!r}")
        elif members not in ("singles", "all"):
            raise SolutionError(f"{w('ensembles')}: {e['name']}.members: a list of names, 'singles' or 'all'")
    if recipe.submit != "best" and recipe.submit not in names:
        raise SolutionError(
            f"{w('submit')}: no candidate named {recipe.submit!r} (known: best, {', '.join(sorted(names))})"
        )
