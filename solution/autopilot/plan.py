"""The whole plan of a recipe: prepare, train, search, soups, ensembles, then every candidate's cross-fitted estimate,
the choice, the submission and the report. The test answers, where given, are read only after the choice."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from solution.common import SolutionError, resolve_device, write_json
from solution.ensembles.make_ensemble import read_ensemble
from solution.formats.hits import align, hits_paths, read_hits, write_hits
from solution.retrieval.metrics import query_hits, recall_from_hits
from solution.retrieval.official import check_submission, read_gold
from solution.soups.ingredients import study_checkpoints
from solution.stats import id_folds

from .evidence import Candidate, choose, fold_scores, rank_key
from .recipe import Recipe
from .report import write_report
from .stages import Stages, soup_crossfit

log = logging.getLogger(__name__)


def check_recipe(recipe: Recipe, stages: Stages) -> None:
    """Every training command of the recipe, and its search, through the trainer's own parser before anything runs."""
    from solution.studies.search_config import check_trial_flags, parse_config
    from solution.training.flags import FlagError, parse_args

    for section in ("starts", "runs"):
        for name, m in getattr(recipe, section).items():
            if m.checkpoint is not None:
                if not Path(m.checkpoint).is_file() and not stages.dry:
                    raise SolutionError(f"{recipe.where(f'{section}.{name}.checkpoint')}: not found: {m.checkpoint}")
                continue
            try:
                parse_args(stages.train_argv(m, Path(f"{m.start}.pt") if m.start else None))
            except FlagError as e:
                key = e.flag.lstrip("-") if e.flag else "train"
                raise SolutionError(f"{recipe.where(f'{section}.{name}.{key}')}: {e}") from None
    if recipe.search:
        start = recipe.search.get("start")
        check_trial_flags(parse_config(stages.search_config(start and Path(f"{start}.pt")), recipe.where("search")))


def run_plan(recipe: Recipe, dry_run: bool = False) -> dict:
    if not dry_run:
        run_plan(recipe, dry_run=True)  # every stage's command checked by its tool's parser before any work
    stages = Stages(recipe, dry_run)
    check_recipe(recipe, stages)
    stages.prepare()
    singles = {n: stages.start(n) for n, m in recipe.starts.items() if m.checkpoint is None}
    singles.update({n: stages.train(m) for n, m in recipe.runs.items()})
    study = stages.search() if recipe.search else None
    if study is not None and not dry_run:
        for path in study_checkpoints(study, int(recipe.search.get("top", 4))):
            singles[f"trial-{path.parents[1].name}"] = path
    soups = stages.soups(singles, study) if recipe.soups else {}
    pool = {**singles, **soups}
    ensembles = {}
    for e in recipe.ensembles:
        members = e.get("members", "singles")
        members = singles if members == "singles" else pool if members == "all" else {m: pool[m] for m in members}
        ensembles[e["name"]] = stages.ensemble(e, members)
    if dry_run:
        return {"commands": stages.commands}
    cands = evidence(stages, singles, soups, ensembles)
    chosen, why = choose(cands, recipe.submit, recipe.prefer_simpler)
    log.info("%s", " ".join(why))
    result = {"candidates": cands, "chosen": chosen, "why": why, "submission": None}
    if (stages.lmdb("test") / "imgs").is_dir():
        result["submission"] = submit(stages, chosen, why)
        if recipe.test_answers is not None:
            test_report(stages, cands, chosen, recipe.test_answers)
    write_report(stages, result)
    return result


def evidence(stages: Stages, singles: dict, soups: dict, ensembles: dict) -> list[Candidate]:
    """Every candidate's held-out hits and fold scores over the same valid queries and the same folds."""
    cands = [_single(stages, name, ckpt) for name, ckpt in singles.items()]
    ids = cands[0].info.pop("ids")
    for c in cands[1:]:
        c.hits = _aligned(c.name, ids, (c.info.pop("ids"), c.hits))
    folds = id_folds(ids, stages.r.folds, stages.r.seed)
    for c in cands:
        c.fold_scores = fold_scores(c.hits, folds)
    for name, path in soups.items():
        method = name.removeprefix("soup-")
        cross = soup_crossfit(stages.out / "soups", method)
        info = {"members": cross["members"], "weights": cross["weights"]}
        cands.append(_held_out(name, "soup", path, cross, ids, info))
    for name, path in ensembles.items():
        spec = read_ensemble(path)
        cross = spec.get("crossfit") or {}
        info = {k: spec.get(k) for k in ("members", "weights", "norm", "rerank", "tta")}
        cands.append(
            _held_out(name, "ensemble", path, {**cross, "hits": path.parent / cross.get("hits", "")}, ids, info)
        )
    return cands


def _single(stages: Stages, name: str, ckpt: Path) -> Candidate:
    """A single model's plain hits on the valid queries (scored once, kept under OUT/evidence/)."""
    base = stages.out / "evidence" / name
    if not hits_paths(base)[0].is_file():
        from solution.model import load_model
        from solution.retrieval.encode import evaluate_split

        model, config, _ = load_model(ckpt, device=resolve_device(stages.r.device))
        rec = evaluate_split(model, stages.lmdb("valid"), config, device=model.logit_scale.device, with_hits=True)
        write_hits(base, rec["text_ids"], rec["hits"])
    ids, hits = read_hits(base)
    order = np.argsort(ids, kind="stable")
    ids, hits = ids[order], hits[order]
    mr = recall_from_hits(hits)["mean_recall"]
    return Candidate(name, "single", str(ckpt), mr, [], hits, {"ids": ids})


def _held_out(name: str, kind: str, source: Path, cross: dict, ids: np.ndarray, info: dict) -> Candidate:
    hits = _aligned(name, ids, read_hits(cross["hits"]))
    return Candidate(name, kind, str(source), float(cross["refit_mean_recall"]), list(cross["fold_scores"]), hits, info)


def _aligned(name: str, ids: np.ndarray, got: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``got``'s hits in the order of the shared query ids."""
    hits = align((ids, None), got)
    if hits is None:
        raise SolutionError(f"candidate {name} was scored on other valid queries than the others")
    return hits


def submit(stages: Stages, chosen: Candidate, why: list[str]) -> Path:
    """``OUT/submission.jsonl`` (top-10 for every test query) and the choice recorded in its manifest."""
    out, manifest = stages.out / "submission.jsonl", stages.out / "submission.json"
    if (
        manifest.is_file()
        and json.loads(manifest.read_text(encoding="utf-8")).get("choice", {}).get("source") != chosen.source
    ):
        out.unlink(missing_ok=True)  # made for another candidate (or killed before its choice was recorded)
    stages.predict(chosen.name, Path(chosen.source), out)
    mean, low, high = chosen.cv
    choice = {"candidate": chosen.name, "kind": chosen.kind, "source": chosen.source, "valid_mr": chosen.valid_mr}
    choice.update({"cv_mr": mean, "cv_low": low, "cv_high": high, "why": why, **chosen.info})
    write_json(manifest, {**json.loads(manifest.read_text(encoding="utf-8")), "choice": choice})
    return out


def test_report(stages: Stages, cands: list[Candidate], chosen: Candidate, answers: Path) -> None:
    """Each candidate's test mean recall from its own submission, and the failure browser of the submission against
    the best single model (for the report only: the choice is made)."""
    answers = answers if answers.is_absolute() else stages.data / answers
    gold, direction = read_gold(answers, "t2i")
    for c in cands:
        sub = stages.predict(c.name, Path(c.source), stages.out / "test" / f"{c.name}.jsonl")
        checked = check_submission(sub, gold.keys(), direction=direction)
        if checked.problems:
            raise SolutionError(f"{sub}: {checked.problems[0]}")
        c.info["test_hits"] = query_hits(checked.predictions, gold)
        c.test_mr = recall_from_hits(c.info["test_hits"])["mean_recall"]
    best = min((c for c in cands if c.kind == "single"), key=rank_key)
    if chosen is not best:
        argv = [
            "--submission",
            stages.out / "submission.jsonl",
            "--against",
            stages.out / "test" / f"{best.name}.jsonl",
        ]
        argv += ["--texts", stages.texts("test"), "--answers", answers, "--image-data", stages.lmdb("test") / "imgs"]
        stages.call("failure browser", "inspect", [*argv, "--output", stages.out / "inspect" / "submission.html"])
