"""A soup run: every check, then one soup per method in a folder beside ``OUT`` that replaces it whole, under its
lock. ``OUT``: ``soup.pt``, ``soup_log.jsonl``, ``summary.json``, ``hits/`` (the score cache), ``merged_round{N}.pt``
(pairwise), ``crossfit/`` (``--folds``); with several methods each in ``OUT/{method}/``, ``OUT/soup.pt`` the best."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from solution.common import SolutionError, check_output, folder_lock, write_json
from solution.formats.hits import write_hits
from solution.formats.kinds import claim_folder, folder_kind
from solution.model import model_template
from solution.model.precision import DTYPES, dtype_name
from solution.plots import candidate_scores
from solution.retrieval.encode import ValData
from solution.stats import crossfit

from . import HITS, SOUP, SUMMARY, methods
from .ingredients import check_compatible, expand_checkpoints, gather, inspect_checkpoint, study_checkpoints
from .methods import Candidates, Soup, log_row, name, scores
from .scoring import Scorer

log = logging.getLogger(__name__)


def check(o) -> None:
    """Refuse flags that mean nothing together (``o``: the command line's flags)."""
    if not o.checkpoints and not o.from_study:
        raise SolutionError("give --checkpoints GLOB ... and/or --from-study DIR")
    if o.from_study and o.top < 1:
        raise SolutionError(f"--top must be at least 1, got {o.top}")
    if "model_stock" in o.methods and not o.interpolate_with:
        raise SolutionError("--method model_stock needs the fine-tunes' start: --interpolate-with CKPT")
    if o.no_score and {"greedy", "pairwise", *(["uniform"] if o.interpolate_with else [])} & {*o.methods}:
        raise SolutionError("--no-score: only uniform and model_stock choose nothing by score (no interpolation)")
    if not o.no_score and not o.val_data:
        raise SolutionError("--val-data is required to score (or use --method uniform --no-score)")
    if o.interpolate_with and (not o.alphas or any(not 0 <= a <= 1 for a in o.alphas)):
        raise SolutionError(f"--alphas must be numbers in [0, 1], got {list(o.alphas)}")
    if o.max_rounds < 1:
        raise SolutionError("--max-rounds must be at least 1")
    if o.select_split is not None and not 0 < o.select_split < 1:
        raise SolutionError(f"--select-split must be a fraction in (0, 1), got {o.select_split}")
    if o.folds is not None and (o.select_split or o.no_score or o.folds < 2):
        raise SolutionError(f"--folds {o.folds}: at least 2, holding out every query once (no --select-split)")


def _prepare(o):
    """Every check before any work: ``(ingredients, duplicates, base, val, config, dtype)``."""
    out = Path(o.output)
    paths = expand_checkpoints(o.checkpoints, exclude=out) if o.checkpoints else []
    if o.from_study:
        seen = {q.resolve() for q in paths}
        paths += [p for p in study_checkpoints(o.from_study, o.top) if p.resolve() not in seen]
    inputs = [*paths, *([Path(o.interpolate_with)] if o.interpolate_with else [])]
    check_output(out, inputs=inputs, what="--output", is_dir=True)
    inside = next((p for p in inputs if out.resolve() in p.resolve().parents), None)
    if inside is not None:
        raise SolutionError(f"{inside} is one of the inputs but lies inside --output {out}, which the soup replaces")
    if out.is_dir() and any(out.iterdir()) and folder_kind(out) is None:
        raise SolutionError(f"--output {out} holds files but no soup, and a soup replaces its folder: choose another")
    val = None if o.no_score else ValData(o.val_data, o.val_texts, o.select_split, o.seed)
    if o.folds and not o.folds <= len(val.select):
        raise SolutionError(f"--folds {o.folds}: need 2 <= K <= {len(val.select)} (the validation queries)")
    ings, duplicates = gather(paths)
    base = inspect_checkpoint(Path(o.interpolate_with)) if o.interpolate_with else None
    if base is not None:
        check_compatible(base, ings[0], strict=False)
    if "model_stock" in o.methods and sum(i.key != base.key for i in ings) < 2:
        raise SolutionError("--method model_stock needs at least 2 distinct fine-tunes besides their start")
    config = ings[0].config
    if len({json.dumps(i.config.tuning, sort_keys=True) for i in ings}) > 1:
        log.info("ingredients were tuned differently (full, LoRA merged, frozen towers): the soup is plain weights")
        config = dataclasses.replace(config, tuning={"mode": "full"})
    dtypes = {i.dtype for i in ings}
    shared = dtypes.pop() if len(dtypes) == 1 and None not in dtypes else torch.float32
    dtype = DTYPES[o.dtype] if o.dtype != "auto" else shared
    log.info("%d checkpoints, %d distinct: %s; soup dtype %s", len(paths), len(ings), config.arch, dtype_name(dtype))
    return ings, duplicates, base, val, config, dtype


@contextlib.contextmanager
def _building(out: Path) -> Iterator[Path]:
    """Lock ``out``, yield a new soup folder beside it (holding ``out``'s hits) and swap it in whole when the block
    succeeds: a failure or a kill leaves ``out`` as it was (a kill's leftovers are removed by the next run)."""
    tmp, old = out.parent / f".{out.name}.building", out.parent / f".{out.name}.old"
    try:
        claim_folder(out if out.exists() else tmp, "soup")  # refused: another kind, inside an LMDB or data folder
        with folder_lock(out.parent / f".{out.name}.lock", f"--output {out}"):
            if old.is_dir() and not out.exists():
                old.rename(out)  # killed between the two renames below
            for stale in (tmp, old):
                shutil.rmtree(stale, ignore_errors=True)
            try:
                claim_folder(tmp, "soup")
                if (out / HITS).is_dir():
                    shutil.copytree(out / HITS, tmp / HITS, copy_function=os.link)  # same filesystem
                yield tmp
                if out.exists():
                    out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except SolutionError as e:
        raise SolutionError(str(e).replace(str(tmp), str(out))) from None


def _scored(c: Candidates, ings: list) -> list:
    """The ingredients with their scores, each as it would be saved in the soup dtype."""
    return [dataclasses.replace(i, score=c.scorer.score(c.key([(i, 1.0)]), i.path)) for i in ings]


def _row(ing, kind: str, duplicates: dict) -> dict:
    dups = [d for d, kept in duplicates.items() if kept == ing.path]
    return log_row(kind, 0, {ing.path: 1.0}, ing.score, True, name(ing.path), fingerprint=ing.key, duplicates=dups)


def _cook(method: str, c: Candidates, ings: list, base, o) -> Soup:
    if method == "model_stock":
        return methods.model_stock([i for i in ings if i.key != base.key], c, base)
    soup = methods.pairwise(ings, c, o.max_rounds) if method == "pairwise" else getattr(methods, method)(ings, c)
    return methods.interpolate(soup, base, o.alphas, c) if base is not None else soup


def _crossfit(method: str, c: Candidates, ings: list, base, o, folder: Path) -> dict:
    """The method chosen without each fold and its hits on that fold (the summary's ``crossfit``)."""
    scorer, tids, fold = c.scorer, c.scorer.tids, itertools.count(1)

    def select_fn(rows: np.ndarray) -> Soup | None:
        if len(rows) == len(tids):
            return None  # the refit on all queries: the run that follows
        train = set(rows.tolist())
        scorer.select, scorer.report = [tids[i] for i in rows], [t for i, t in enumerate(tids) if i not in train]
        fold_ings = _scored(c, ings)
        c.start(folder / "crossfit" / f"fold{next(fold)}", [_row(i, "ingredient", {}) for i in fold_ings])
        return dataclasses.replace(_cook(method, c, fold_ings, base, o), source="")  # the weights are not kept

    try:
        r = crossfit(
            select_fn, lambda soup, rows: scorer.hits(soup.key)[rows], np.arange(len(tids)), o.folds, o.seed, ids=tids
        )
    finally:
        scorer.select, scorer.report = list(scorer.val.select), list(scorer.val.report)
    return {
        "k": o.folds,
        **{k: getattr(r, k) for k in ("fold_scores", "mean", "low", "high", "interval")},
        "hits": str(write_hits(folder / "crossfit" / "held_out", tids, r.held_out).relative_to(folder)),
        "folds": [[tids[i] for i in f] for f in r.folds],
        "fold_members": [{"members": list(s.members), "weights": list(s.members.values())} for s in r.choices],
    }


def make_soups(o) -> dict:
    """Run every method of ``o`` (the command line's flags); returns ``OUT/summary.json``'s content."""
    check(o)
    ings, duplicates, base, val, config, dtype = _prepare(o)
    out = Path(o.output)
    with _building(out) as tmp:
        scorer = Scorer(val, config, tmp, o, dtype) if val else None
        c, rows = Candidates(config, model_template(config), dtype, scorer), []
        if scorer:
            ings, base = _scored(c, ings), base and _scored(c, [base])[0]
            rows = [_row(i, "ingredient", duplicates) for i in ings]
            rows += [_row(base, "base", duplicates)] if base else []
        best = max((i for i in ings if i.score), key=lambda i: i.score["mean_recall"], default=None)
        selection = val and {"fraction": o.select_split, "seed": o.seed, "select_text_ids": val.select}
        shared = {
            "best_single": {"path": best.path, **scores(best.score)} if best else None,
            "duplicates": duplicates,
            "dtype": dtype_name(dtype),
            "selection": selection and {**selection, "report_text_ids": val.report},
        }
        soups, series = {}, {}
        for m in o.methods:
            folder = tmp / m if len(o.methods) > 1 else tmp
            cross = _crossfit(m, c, ings, base, o, folder) if o.folds else None
            c.start(folder, rows)
            soup = _cook(m, c, ings, base, o)
            series[m] = [r["mean_recall"] for r in c.rows[len(rows) :] if r.get("mean_recall") is not None]
            soup.source = str(c.save(folder / SOUP, soup))  # frees the weights
            soups[m] = {"checkpoint": str(out / folder.relative_to(tmp) / SOUP), "members": list(soup.members)}
            soups[m].update(weights=list(soup.members.values()), **soup.extra, **scores(soup.score))
            if cross:
                soups[m]["crossfit"] = {**cross, "refit_mean_recall": soup.score["mean_recall"]}
            one = {"soup": soups[m]["checkpoint"], "method": m, "soups": {m: soups[m]}, **shared}
            write_json(folder / SUMMARY, one)
            log.info("%s: mean recall %s, %d members", m, soups[m].get("mean_recall"), len(soup.members))
        if o.report_to == "tensorboard":  # each method's candidates, in the order tried
            candidate_scores(tmp, {f"{m}/mean_recall": v for m, v in series.items()})
        chosen = max(soups, key=lambda m: soups[m].get("mean_recall") or 0.0)
        if len(o.methods) > 1:
            os.link(tmp / chosen / SOUP, tmp / SOUP)
            for m in o.methods if o.folds else ():  # relative to the summary's folder
                soups[m]["crossfit"] = {**soups[m]["crossfit"], "hits": f"{m}/{soups[m]['crossfit']['hits']}"}
            write_json(tmp / SUMMARY, {"soup": str(out / SOUP), "method": chosen, "soups": soups, **shared})
        return json.loads((tmp / SUMMARY).read_text(encoding="utf-8"))
