"""A soup run: ingredients in, one soup per method out (the work behind ``python -m solution.soup``).

Every check comes before any work: the output folder, the ingredients' configs and shapes
(memory-mapped), their fingerprints and compatibility (:mod:`.ingredients`). Then each ingredient
is scored (:mod:`.scoring`) and each method run (:mod:`.methods`), optionally followed by
interpolation with a base checkpoint.

Output folder (one method): ``soup.pt`` (cn_clip checkpoint + ``config`` + ``recipe`` {method,
members, weights, score}), ``soup_log.jsonl`` (the ingredients, then one line per candidate),
``summary.json``, ``score_cache.json``, ``hits/`` (every scored candidate's per-query hits, named in
its log line and summary entry relative to ``OUT``), and for pairwise ``merged_round{N}.pt``. With several
methods each gets such a folder ``OUT/{method}/``, sharing ``OUT/score_cache.json``; ``OUT/soup.pt``
(a hard link) and ``OUT/summary.json`` name the best of them. Every summary's ``significance`` holds
each soup's mean-recall difference to the best single ingredient over all the validation queries with
its 95% paired-bootstrap interval (:func:`solution.stats.paired_bootstrap`, 1000 resamples,
seed 0), also logged.

With ``--folds K`` each method is first cross-fitted over the validation queries
(:func:`solution.stats.crossfit`, folds drawn with ``--seed``): for each fold it chooses on the
other K-1 folds (ingredients rescored there, log in ``{method folder}/crossfit/fold{N}/``) and its soup
is scored on the fold left out; the summary entry's ``crossfit`` holds the held-out scores, their mean
and 95% interval. The soup shipped is the method run on all queries, as without ``--folds``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from solution.common import SolutionError, atomic_path, check_output, resolve_device, write_json
from solution.formats.hits import align, read_hits
from solution.model.precision import DTYPES, dtype_name
from solution.retrieval.metrics import RECALL_KEYS
from solution.retrieval.val_data import ValData
from solution.stats import crossfit, paired_bootstrap

from . import methods as recipes
from .ingredients import (
    Ingredient,
    check_compatible,
    check_output_folder,
    expand_checkpoints,
    gather,
    inspect_checkpoint,
    study_checkpoints,
)
from .methods import LOG_NAME, METHODS, Pot, Soup, log_row
from .scoring import ScoreCache, Scorer
from .weights import recipe_key

log = logging.getLogger(__name__)

CACHE_NAME, SUMMARY_NAME, HITS_DIR = "score_cache.json", "summary.json", "hits"
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
    device: str | torch.device = "auto"  # resolved when something is scored
    interpolate_with: str | None = None
    alphas: tuple = (0.25, 0.5, 0.75)
    max_rounds: int = 20
    dtype: str = "auto"  # or a key of DTYPES
    folds: int | None = None  # k-fold cross-fitting over the validation queries

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
        if self.folds is not None:
            if self.select_split:
                raise SolutionError(
                    "--folds and --select-split exclude each other (cross-fitting holds out every query once)"
                )
            if self.no_score:
                raise SolutionError("--folds needs scores (not --no-score)")
            if self.folds < 2:
                raise SolutionError(f"--folds must be at least 2, got {self.folds}")


def _paths(opts: SoupOptions, out: Path) -> list[Path]:
    paths = expand_checkpoints(opts.checkpoints, exclude=out) if opts.checkpoints else []
    if opts.from_study:
        seen = {q.resolve() for q in paths}
        paths += [p for p in study_checkpoints(opts.from_study, opts.top) if p.resolve() not in seen]
    return paths


def _soup_dtype(opts: SoupOptions, ings: Sequence[Ingredient]) -> torch.dtype:
    """``--dtype``; auto: the ingredients' own when they share one, else fp32."""
    if opts.dtype != "auto":
        return DTYPES[opts.dtype]
    dtypes = {i.dtype for i in ings}
    return dtypes.pop() if len(dtypes) == 1 and None not in dtypes else torch.float32


def _score_ingredients(
    scorer: Scorer, ings: list[Ingredient], base: Ingredient | None, duplicates: dict, dtype: torch.dtype
) -> list[dict]:
    """Score every ingredient (and the base) as it would be saved in the soup dtype; their log rows."""
    rows = []
    for ing in ings + ([base] if base else []):
        ing.score = scorer.score(recipe_key([(ing.key, 1.0)], dtype_name(dtype)), ing.path)
        rows.append(
            log_row(
                "ingredient" if ing is not base else "base",
                0,
                {ing.path: 1.0},
                ing.score,
                True,
                fingerprint=ing.fingerprint,
                duplicates=[d for d, o in duplicates.items() if o == ing.path],
            )
        )
    return rows


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src``, atomically (hard link, else a copy)."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _scores(score: dict | None) -> dict:
    if not score:
        return {}
    out = {k: score.get(k) for k in RECALL_KEYS}
    for part in ("report", "all", "hits"):
        if score.get(part):
            out[part] = score[part]
    return out


def significance(root: Path, soups: dict, best_single: dict | None) -> dict | None:
    """Each soup (``{method: summary entry}``) minus ``best_single`` over all the validation queries,
    paired bootstrap; entries without hits are left out. None without the reference's hits."""
    if not best_single or not best_single.get("hits"):
        return None
    ref = read_hits(root / best_single["hits"])
    rows = {}
    for m, s in soups.items():
        if not s.get("hits"):
            continue
        mine = read_hits(root / s["hits"])
        other = align(mine, ref)
        if other is None:
            continue
        b = paired_bootstrap(mine[1], other, n_resamples=N_RESAMPLES, seed=BOOTSTRAP_SEED)
        rows[m] = {"diff": b.diff, "low": b.low, "high": b.high, "significant": b.significant}
    return {
        "reference": best_single["path"],
        "queries": "all",
        "n_resamples": N_RESAMPLES,
        "seed": BOOTSTRAP_SEED,
        "ci": 0.95,
        "soups": rows,
    }


def _summary(
    folder: Path,
    results: dict,
    ings: list[Ingredient],
    duplicates: dict,
    opts: SoupOptions,
    dtype: torch.dtype,
    val: ValData | None,
    root: Path,
    crossfits: dict,
) -> dict:
    scored = [i for i in ings if i.score]
    best_single = max(scored, key=lambda i: i.score["mean_recall"]) if scored else None
    best = max(results, key=lambda m: (results[m].score or {}).get("mean_recall", 0.0))
    soups = {
        m: {
            "checkpoint": s.source,
            "members": list(s.members),
            "weights": list(s.members.values()),
            **s.extra,
            **_scores(s.score),
        }
        for m, s in results.items()
    }
    for m in soups:
        if crossfits.get(m):
            soups[m]["crossfit"] = crossfits[m]
    single = {"path": best_single.path, **_scores(best_single.score)} if best_single else None
    return {
        "soup": str(folder / "soup.pt"),
        "method": best,
        "soups": soups,
        "best_single": single,
        "significance": significance(root, soups, single),
        "ingredients": [{"path": i.path, "fingerprint": i.fingerprint, **_scores(i.score)} for i in ings],
        "duplicates": duplicates,
        "dtype": dtype_name(dtype),
        "selection": (
            {
                "fraction": opts.select_split,
                "seed": opts.seed,
                "select_text_ids": val.select,
                "report_text_ids": val.report,
            }
            if val
            else None
        ),
    }


def _cook(method: str, pot: Pot, ings: list[Ingredient], base: Ingredient | None, opts: SoupOptions) -> Soup:
    if method == "pairwise":
        soup = recipes.pairwise(ings, pot, opts.max_rounds)
    else:
        soup = getattr(recipes, method)(ings, pot)
    return recipes.interpolate(soup, base, opts.alphas, pot) if base is not None else soup


def _crossfit(
    method: str,
    pot: Pot,
    ings: list[Ingredient],
    base: Ingredient | None,
    opts: SoupOptions,
    mdir: Path,
    dtype: torch.dtype,
) -> dict:
    """``--folds``: the method chosen without each fold, scored on it; the summary's ``crossfit`` entry."""
    scorer, ids = pot.scorer, list(pot.scorer.val.select)
    fold_no = [0]

    def select_fn(rows: np.ndarray) -> dict | None:
        if len(rows) == len(ids):
            return None  # the refit on all queries: the soup run that follows
        chosen = set(rows.tolist())
        view = scorer.view([ids[i] for i in rows], [t for i, t in enumerate(ids) if i not in chosen])
        fold_no[0] += 1
        fold_ings = [
            dataclasses.replace(i, score=view.score(recipe_key([(i.key, 1.0)], dtype_name(dtype)), i.path))
            for i in ings
        ]
        rows0 = [log_row("ingredient", 0, {i.path: 1.0}, i.score, True) for i in fold_ings]
        pot.scorer = view
        try:
            pot.start(mdir / "crossfit" / f"fold{fold_no[0]}", rows0)
            soup = _cook(method, pot, fold_ings, base, opts)
        finally:
            pot.scorer = scorer
            scorer.release()
        return {"members": soup.members, "held_out": view.report, "score": soup.score}

    def score_fn(choice: dict, rows: np.ndarray) -> float:  # the fold left out is the choice's report part
        return choice["score"]["report"]["mean_recall"]

    result = crossfit(select_fn, score_fn, np.arange(len(ids)), k=opts.folds, seed=opts.seed)
    return {
        "k": opts.folds,
        "seed": opts.seed,
        "fold_scores": result.fold_scores,
        "mean": result.mean,
        "low": result.low,
        "high": result.high,
        "interval": result.interval,
        "folds": [c["held_out"] for c in result.choices],
        "fold_members": [
            {"members": list(c["members"]), "weights": [float(w) for w in c["members"].values()]}
            for c in result.choices
        ],
    }


def _prepare(opts: SoupOptions, out: Path):
    """Every check before any work; ``(ingredients, duplicates, template, base, val, cache, config, dtype)``."""
    paths = _paths(opts, out)
    check_output_folder(out, opts.methods, [*paths, opts.interpolate_with], (LOG_NAME, CACHE_NAME, SUMMARY_NAME))
    check_output(out / HITS_DIR, what="--output's hits folder", is_dir=True)
    val = None if opts.no_score else ValData(opts.val_data, opts.val_texts, opts.select_split, opts.seed)
    if opts.folds and not opts.folds <= len(val.select):
        raise SolutionError(f"--folds {opts.folds}: need 2 <= K <= {len(val.select)} (the validation queries)")
    for m in opts.methods if opts.folds else ():
        check_output(
            out / m / "crossfit" if len(opts.methods) > 1 else out / "crossfit",
            what="--output's crossfit folder",
            is_dir=True,
        )
    cache = ScoreCache(out / CACHE_NAME)
    ings, duplicates, template = gather(paths, cache.fingerprints)
    base = None
    if opts.interpolate_with:
        base = inspect_checkpoint(Path(opts.interpolate_with), cache.fingerprints)
        check_compatible(base, ings[0], template, strict=False)
    config = ings[0].config
    if len({json.dumps(i.config.tuning, sort_keys=True) for i in ings}) > 1:
        log.info("ingredients were tuned differently (full, LoRA merged, frozen towers): the soup is plain weights")
        config = dataclasses.replace(config, tuning={"mode": "full"})
    dtype = _soup_dtype(opts, ings)
    log.info(
        "%d checkpoints, %d distinct: %s, prompt %r, context length %d; soup dtype %s",
        len(paths),
        len(ings),
        config.arch,
        config.text_prompt,
        config.context_length,
        dtype_name(dtype),
    )
    return ings, duplicates, template, base, val, cache, config, dtype


def make_soups(opts: SoupOptions) -> dict:
    """Run every method of ``opts``; the summary written to ``OUT/summary.json``."""
    opts.check()
    out = Path(opts.output)
    ings, duplicates, template, base, val, cache, config, dtype = _prepare(opts, out)
    out.mkdir(parents=True, exist_ok=True)
    scorer = None
    if val is not None:
        scorer = Scorer(
            val,
            config,
            cache,
            device=resolve_device(opts.device),
            batch_size=opts.batch_size,
            num_workers=opts.num_workers,
            precision=opts.precision,
            round_to=dtype,
            hits_dir=out / HITS_DIR,
        )
    cache.save()
    rows = _score_ingredients(scorer, ings, base, duplicates, dtype) if scorer else []
    pot = Pot(config, template, dtype, scorer)
    results: dict[str, Soup] = {}
    crossfits: dict[str, dict] = {}
    for method in opts.methods:
        mdir = out if len(opts.methods) == 1 else out / method
        if opts.folds:
            crossfits[method] = _crossfit(method, pot, ings, base, opts, mdir, dtype)
        pot.start(mdir, rows)
        soup = _cook(method, pot, ings, base, opts)
        if scorer:
            scorer.release()
        soup.source = str(pot.save(mdir / "soup.pt", soup))  # frees the in-memory weights
        results[method] = soup
        write_json(
            mdir / SUMMARY_NAME, _summary(mdir, {method: soup}, ings, duplicates, opts, dtype, val, out, crossfits)
        )
    if len(opts.methods) > 1:
        best = max(results.values(), key=lambda s: s.score["mean_recall"]) if scorer else results[opts.methods[0]]
        _link(Path(best.source), out / "soup.pt")
        write_json(out / SUMMARY_NAME, _summary(out, results, ings, duplicates, opts, dtype, val, out, crossfits))
    for m, s in results.items():
        log.info(
            "%-9s mean recall %s%s with %d members -> %s",
            m,
            recipes.fmt_recall((s.score or {}).get("mean_recall")),
            f" (report {recipes.fmt_recall(s.score['report']['mean_recall'])})"
            if s.score and s.score.get("report")
            else "",
            len(s.members),
            s.source,
        )
    for m, c in crossfits.items():
        log.info(
            "%-9s cross-fit over %d folds (held-out mean recall): %.3f, 95%% interval [%.3f, %.3f]",
            m,
            c["k"],
            c["mean"],
            c["low"],
            c["high"],
        )
    summary = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    sig = summary.get("significance") or {"soups": {}}
    for m, b in sig["soups"].items():
        log.info(
            "%-9s vs best single %s (all queries): %+.2f points, 95%% interval [%.2f, %.2f]%s",
            m,
            sig["reference"],
            b["diff"],
            b["low"],
            b["high"],
            "" if b["significant"] else " (contains 0: not significant)",
        )
    return summary
