"""A soup run: ingredients in, one soup per method out (the work behind ``python -m solution.soup``).

Every check comes before any work. Output folder (one method): ``soup.pt`` (a cn_clip checkpoint with
``config`` and ``recipe``), ``soup_log.jsonl`` (the ingredients, then one line per candidate),
``summary.json``, ``score_cache.json``, ``hits/`` (each scored candidate's per-query hits, named
relative to ``OUT``) and for pairwise ``merged_round{N}.pt``. With several methods each gets
``OUT/{method}/``, sharing ``OUT/score_cache.json`` and ``OUT/hits/``; ``OUT/soup.pt`` (a hard link)
and ``OUT/summary.json`` name the best. A summary's ``significance``: each soup minus the best single
ingredient over all queries, paired bootstrap. With ``--folds K`` each method is first cross-fitted
(logs in ``{method folder}/crossfit/fold{N}/``, the summary's ``crossfit``); the soup shipped is the
one chosen on all queries.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from solution.common import SolutionError, atomic_path, check_output, write_json
from solution.formats.hits import align, read_hits
from solution.model import model_template
from solution.model.precision import DTYPES, dtype_name
from solution.retrieval.encode import ValData
from solution.retrieval.metrics import RECALL_KEYS
from solution.stats import crossfit, paired_bootstrap

from . import CACHE, HITS, LOG, SOUP, SUMMARY, methods
from .ingredients import Ingredient, check_compatible, expand_checkpoints, gather, inspect_checkpoint, study_checkpoints
from .methods import METHODS, Candidates, Soup, fmt_recall, log_row
from .scoring import ScoreCache, Scorer
from .weights import recipe_key

log = logging.getLogger(__name__)

N_RESAMPLES, BOOTSTRAP_SEED = 1000, 0


@dataclasses.dataclass(frozen=True)
class SoupOptions:
    """A soup run, as plain values (the command line's flags)."""

    output: str
    methods: tuple = ("greedy",)
    checkpoints: tuple = ()  # files or glob patterns
    from_study: str | None = None
    top: int = 5
    val_data: str | None = None
    val_texts: str | None = None
    select_split: float | None = None
    seed: int = 0
    no_score: bool = False
    batch_size: int = 64
    num_workers: int = 0
    precision: str = "fp32"
    device: str | torch.device = "auto"
    interpolate_with: str | None = None
    alphas: tuple = (0.25, 0.5, 0.75)
    max_rounds: int = 20
    dtype: str = "auto"  # or a key of DTYPES; auto: the ingredients' own when they share one
    folds: int | None = None

    def check(self) -> None:
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise SolutionError(f"--method must name some of {', '.join(METHODS)}, got {list(self.methods)}")
        if not self.checkpoints and not self.from_study:
            raise SolutionError("give --checkpoints GLOB ... and/or --from-study DIR")
        if self.no_score and (list(self.methods) != ["uniform"] or self.interpolate_with):
            raise SolutionError("--no-score works with --method uniform only (the other methods choose by score)")
        if not self.no_score and not self.val_data:
            raise SolutionError("--val-data is required to score (or use --method uniform --no-score)")
        if self.interpolate_with and (not self.alphas or any(not 0 <= a <= 1 for a in self.alphas)):
            raise SolutionError(f"--alphas must be numbers in [0, 1], got {list(self.alphas)}")
        if self.max_rounds < 1:
            raise SolutionError("--max-rounds must be at least 1")
        if self.folds is not None and self.select_split:
            raise SolutionError(
                "--folds and --select-split exclude each other (cross-fitting holds out every query once)"
            )
        if self.folds is not None and self.no_score:
            raise SolutionError("--folds needs scores (not --no-score)")
        if self.folds is not None and self.folds < 2:
            raise SolutionError(f"--folds must be at least 2, got {self.folds}")

    def folder(self, method: str) -> Path:
        return Path(self.output) if len(self.methods) == 1 else Path(self.output) / method


def _check_output(opts: SoupOptions, inputs: Sequence) -> None:
    """Refuse an ``--output`` the soup cannot write, or whose files would replace one of its inputs."""
    out = Path(opts.output)
    check_output(out, inputs=inputs, what="--output", is_dir=True)
    check_output(out / HITS, what="--output's hits folder", is_dir=True)
    for d in dict.fromkeys([out, *(opts.folder(m) for m in opts.methods)]):
        check_output(d, what="--output's method folder", is_dir=True)
        for name in (SOUP, LOG, CACHE, SUMMARY):
            check_output(d / name, inputs=inputs, what="--output's file")
    for m in opts.methods if opts.folds else ():
        check_output(opts.folder(m) / "crossfit", what="--output's crossfit folder", is_dir=True)
    merged = opts.folder("pairwise").resolve() if "pairwise" in opts.methods else None
    for src in (Path(x) for x in inputs if x is not None):
        if src.resolve().parent == merged and re.fullmatch(r"merged_round\d+\.pt", src.name):
            raise SolutionError(
                f"{src} is one of the inputs but a pairwise soup in {out} rewrites it; choose another --output"
            )


def _prepare(opts: SoupOptions):
    """Every check before any work: ``(ingredients, duplicates, base, val, cache, config, dtype)``."""
    out = Path(opts.output)
    paths = expand_checkpoints(opts.checkpoints, exclude=out) if opts.checkpoints else []
    if opts.from_study:
        seen = {q.resolve() for q in paths}
        paths += [p for p in study_checkpoints(opts.from_study, opts.top) if p.resolve() not in seen]
    _check_output(opts, [*paths, opts.interpolate_with])
    val = None if opts.no_score else ValData(opts.val_data, opts.val_texts, opts.select_split, opts.seed)
    if opts.folds and not opts.folds <= len(val.select):
        raise SolutionError(f"--folds {opts.folds}: need 2 <= K <= {len(val.select)} (the validation queries)")
    cache = ScoreCache(out / CACHE)
    ings, duplicates = gather(paths, cache.fingerprints)
    base = None
    if opts.interpolate_with:
        base = inspect_checkpoint(Path(opts.interpolate_with), cache.fingerprints)
        check_compatible(base, ings[0], strict=False)
    config = ings[0].config
    if len({json.dumps(i.config.tuning, sort_keys=True) for i in ings}) > 1:
        log.info("ingredients were tuned differently (full, LoRA merged, frozen towers): the soup is plain weights")
        config = dataclasses.replace(config, tuning={"mode": "full"})
    dtypes = {i.dtype for i in ings}
    shared = dtypes.pop() if len(dtypes) == 1 and None not in dtypes else torch.float32
    dtype = DTYPES[opts.dtype] if opts.dtype != "auto" else shared
    log.info(
        "%d checkpoints, %d distinct: %s, prompt %r, context length %d; soup dtype %s",
        len(paths),
        len(ings),
        config.arch,
        config.text_prompt,
        config.context_length,
        dtype_name(dtype),
    )
    return ings, duplicates, base, val, cache, config, dtype


def _scored(scorer: Scorer, ings: Sequence[Ingredient], dtype: torch.dtype) -> list[Ingredient]:
    """The ingredients with their scores, each as it would be saved in the soup dtype."""
    return [dataclasses.replace(i, score=scorer.score(recipe_key([(i, 1.0)], dtype_name(dtype)), i.path)) for i in ings]


def _row(ing: Ingredient, kind: str, duplicates: dict) -> dict:
    dups = [d for d, kept in duplicates.items() if kept == ing.path]
    return log_row(kind, 0, {ing.path: 1.0}, ing.score, True, fingerprint=ing.fingerprint, duplicates=dups)


def _cook(method: str, c: Candidates, ings: list[Ingredient], base: Ingredient | None, opts: SoupOptions) -> Soup:
    soup = methods.pairwise(ings, c, opts.max_rounds) if method == "pairwise" else getattr(methods, method)(ings, c)
    return methods.interpolate(soup, base, opts.alphas, c) if base is not None else soup


def _crossfit(method: str, c: Candidates, ings: list, base, opts: SoupOptions, dtype: torch.dtype) -> dict:
    """``--folds``: the method chosen without each fold and scored on it; the summary's ``crossfit``."""
    scorer, ids, fold = c.scorer, list(c.scorer.select), itertools.count(1)

    def select_fn(rows: np.ndarray) -> dict | None:
        if len(rows) == len(ids):
            return None  # the refit on all queries: the run that follows
        chosen = set(rows.tolist())
        c.scorer = view = scorer.view([ids[i] for i in rows], [t for i, t in enumerate(ids) if i not in chosen])
        try:
            fold_ings = _scored(view, ings, dtype)
            c.start(
                opts.folder(method) / "crossfit" / f"fold{next(fold)}", [_row(i, "ingredient", {}) for i in fold_ings]
            )
            soup = _cook(method, c, fold_ings, base, opts)
        finally:
            c.scorer = scorer
            scorer.release()
        return {"members": soup.members, "held_out": view.report, "score": soup.score}

    def score_fn(choice: dict, rows: np.ndarray) -> float:  # the fold left out is the choice's report part
        return choice["score"]["report"]["mean_recall"]

    r = crossfit(select_fn, score_fn, np.arange(len(ids)), k=opts.folds, seed=opts.seed)
    return {
        "k": opts.folds,
        "seed": opts.seed,
        **{k: getattr(r, k) for k in ("fold_scores", "mean", "low", "high", "interval")},
        "folds": [ch["held_out"] for ch in r.choices],
        "fold_members": [{"members": list(ch["members"]), "weights": list(ch["members"].values())} for ch in r.choices],
    }


def _scores(score: dict | None) -> dict:
    if not score:
        return {}
    return {
        **{k: score.get(k) for k in RECALL_KEYS},
        **{p: score[p] for p in ("report", "all", "hits") if score.get(p)},
    }


def significance(root: Path, soups: dict, best_single: dict | None) -> dict | None:
    """Each soup (with hits) minus ``best_single`` over all the validation queries, paired bootstrap;
    None without the reference's hits."""
    if not best_single or not best_single.get("hits"):
        return None
    ref, rows = read_hits(root / best_single["hits"]), {}
    for m, s in soups.items():
        mine = read_hits(root / s["hits"]) if s.get("hits") else None
        other = align(mine, ref) if mine is not None else None
        if other is not None:
            b = paired_bootstrap(mine[1], other, n_resamples=N_RESAMPLES, seed=BOOTSTRAP_SEED)
            rows[m] = {"diff": b.diff, "low": b.low, "high": b.high, "significant": b.significant}
    params = {"queries": "all", "n_resamples": N_RESAMPLES, "seed": BOOTSTRAP_SEED, "ci": 0.95}
    return {"reference": best_single["path"], **params, "soups": rows}


def _best(results: dict) -> str:
    return max(results, key=lambda m: (results[m].score or {}).get("mean_recall", 0.0))


def _summary(folder: Path, results: dict, ings, duplicates, opts, dtype, val, crossfits: dict) -> dict:
    scored = [i for i in ings if i.score]
    best_single = max(scored, key=lambda i: i.score["mean_recall"]) if scored else None
    soups = {
        m: {
            "checkpoint": s.source,
            "members": list(s.members),
            "weights": list(s.members.values()),
            **s.extra,
            **_scores(s.score),
            **({"crossfit": crossfits[m]} if crossfits.get(m) else {}),
        }
        for m, s in results.items()
    }
    single = {"path": best_single.path, **_scores(best_single.score)} if best_single else None
    selection = {"fraction": opts.select_split, "seed": opts.seed} if val else None
    return {
        "soup": str(folder / SOUP),
        "method": _best(results),
        "soups": soups,
        "best_single": single,
        "significance": significance(Path(opts.output), soups, single),
        "ingredients": [{"path": i.path, "fingerprint": i.fingerprint, **_scores(i.score)} for i in ings],
        "duplicates": duplicates,
        "dtype": dtype_name(dtype),
        "selection": selection and {**selection, "select_text_ids": val.select, "report_text_ids": val.report},
    }


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src``, atomically (hard link, else a copy)."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def make_soups(opts: SoupOptions) -> dict:
    """Run every method of ``opts``; the summary written to ``OUT/summary.json``."""
    opts.check()
    out = Path(opts.output)
    ings, duplicates, base, val, cache, config, dtype = _prepare(opts)
    out.mkdir(parents=True, exist_ok=True)
    scorer, rows = None, []
    if val is not None:
        scorer = Scorer(val, config, cache, opts, dtype, hits_dir=out / HITS)
    cache.save()
    if scorer:
        ings = _scored(scorer, ings, dtype)
        base = base and _scored(scorer, [base], dtype)[0]
        rows = [_row(i, "ingredient", duplicates) for i in ings] + ([_row(base, "base", duplicates)] if base else [])
    c = Candidates(config, model_template(config), dtype, scorer)
    results, crossfits = {}, {}
    for method in opts.methods:
        if opts.folds:
            crossfits[method] = _crossfit(method, c, ings, base, opts, dtype)
        c.start(opts.folder(method), rows)
        soup = _cook(method, c, ings, base, opts)
        if scorer:
            scorer.release()
        soup.source = str(c.save(opts.folder(method) / SOUP, soup))  # frees the in-memory weights
        results[method] = soup
        one = _summary(opts.folder(method), {method: soup}, ings, duplicates, opts, dtype, val, crossfits)
        write_json(opts.folder(method) / SUMMARY, one)
    if len(opts.methods) > 1:
        _link(Path(results[_best(results)].source), out / SOUP)
        write_json(out / SUMMARY, _summary(out, results, ings, duplicates, opts, dtype, val, crossfits))
    summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    for m, s in summary["soups"].items():  # cross-fits and bootstraps were logged as they ran
        report = f" (report {fmt_recall(s['report']['mean_recall'])})" if s.get("report") else ""
        mr, n = fmt_recall(s.get("mean_recall")), len(s["members"])
        log.info("%-9s mean recall %s%s with %d members -> %s", m, mr, report, n, s["checkpoint"])
    return summary
