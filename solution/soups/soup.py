"""Model soups: average fine-tuned checkpoints while the held-out score improves.

``bash Chinese-CLIP/model_soup.sh --checkpoints 'logs/*/checkpoints/*.pt' --val-data DIR/lmdb/valid
--method greedy --output soups/NAME`` (``python -m solution.soup``). Methods:

- ``greedy`` (model soups, Wortsman et al. 2022): score every ingredient, sort best first, add
  each next one as a running average (``n/(n+1)``, ``1/(n+1)``), keep it only if mean recall
  strictly improves.
- ``pairwise`` (the Tianchi recipe): each round average the two best models of the pool; a merge
  that beats the worse of its two members replaces it (saved as ``merged_round{N}.pt``); a merge
  that does not (it scores at or below both) ends the search.
- ``uniform``: the plain average of all.
- ``--interpolate-with CKPT --alphas ...``: ``alpha * soup + (1 - alpha) * CKPT`` (e.g. the zero-shot
  start), chosen by held-out score; ``alpha = 1`` (the soup itself) wins ties.

Ingredients must share architecture, prompt and context length: anything else is refused before
any work, naming the odd checkpoint. Identical ingredients (``best.pt`` and ``epoch_latest.pt`` copy
an ``epoch_N.pt``) are found by a fingerprint of their weights and used once. Weights are streamed:
checkpoints are memory-mapped and read one at a time into fp32 buffers (at most three: soup,
candidate, best interpolation; the scoring model reads them without a copy on CPU), whatever
their number.

Scores are text->image R@1/5/10 and mean recall through :mod:`solution.features` (the path a
submission takes), of the weights exactly as they are saved (rounded to the soup's dtype), cached
in ``OUT/score_cache.json`` under the weights' fingerprint (or recipe) + validation data +
selection, so a re-run or a second method does not re-score. With ``--select-split F`` the soup is
chosen on a random fraction ``F`` of the queries (``r1``..``mean_recall``); the other part is
reported beside it (``"report"``), and all queries together (``"all"``).

Output folder (one method): ``soup.pt`` (cn_clip checkpoint + ``config`` + ``recipe`` {method,
members, weights, score}), ``soup_log.jsonl`` (the ingredients, then one line per candidate),
``summary.json``, ``score_cache.json``, and for pairwise ``merged_round{N}.pt``. With several
methods each gets such a folder ``OUT/{method}/``, sharing ``OUT/score_cache.json``; ``OUT/soup.pt``
(a hard link) and ``OUT/summary.json`` name the best of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from solution.common import SolutionError, atomic_path, read_jsonl, resolve_device, run_cli, write_json, write_jsonl
from solution.model.models import ModelConfig, save_checkpoint
from .ingredients import (Ingredient, Source, State, cast_state, check_compatible, check_output_folder,
                           expand_checkpoints, flatten, inspect_checkpoint, mix, model_template, new_state,
                           recipe_key, study_checkpoints, weights_of)

log = logging.getLogger(__name__)

METHODS = ("greedy", "pairwise", "uniform")
LOG_NAME, CACHE_NAME, SUMMARY_NAME = "soup_log.jsonl", "score_cache.json", "summary.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------- scoring


class ValData:
    """Validation queries (from ``--val-texts`` or the LMDB pairs) and the selection/report split."""

    def __init__(self, split_dir: str, texts_path: str | None, select_split: float | None, seed: int):
        from solution.data.lmdb_io import LMDBSplit

        split_dir = Path(split_dir)
        if not split_dir.exists():
            raise SolutionError(f"validation data not found: {split_dir}")
        if texts_path:
            self.split = LMDBSplit(split_dir, need_pairs=False)
            rows = read_jsonl(texts_path)
            bad = [r for r in rows if not r.get("image_ids") or "text" not in r or "text_id" not in r]
            if not rows or bad:
                raise SolutionError(f"validation texts {texts_path} have no gold image_ids "
                                    f"({len(bad)} of {len(rows)} lines lack text_id/text/image_ids): "
                                    "pass the valid split's *_texts.jsonl, not the test one")
            self.queries = {int(r["text_id"]): (str(r["text"]), [int(i) for i in r["image_ids"]]) for r in rows}
        else:
            if not (split_dir / "pairs" / "data.mdb").is_file():
                raise SolutionError(f"validation data {split_dir} has no texts (no pairs LMDB): "
                                    "pass --val-texts with its *_texts.jsonl")
            self.split = LMDBSplit(split_dir)
            self.queries = dict(self.split.queries())
            if not self.queries:
                raise SolutionError(f"validation data {split_dir} has no texts (its pairs LMDB is empty)")
        gallery = set(self.split.image_ids())
        missing = sum(i not in gallery for _, gold in self.queries.values() for i in gold)
        if missing:
            log.warning("validation: %d gold image ids are not in %s (they count as misses)", missing, split_dir)
        tids = list(self.queries)
        if select_split:
            if not 0 < select_split < 1:
                raise SolutionError(f"--select-split must be a fraction in (0, 1), got {select_split}")
            if len(tids) < 2:
                raise SolutionError("--select-split needs at least 2 validation queries")
            perm = tids[:]
            random.Random(seed).shuffle(perm)
            n = min(max(1, round(select_split * len(tids))), len(tids) - 1)
            chosen = set(perm[:n])
            self.select = [t for t in tids if t in chosen]
            self.report = [t for t in tids if t not in chosen]
        else:
            self.select, self.report = tids, []
        h = hashlib.blake2b(digest_size=16)
        for sub in ("imgs", "pairs"):
            f = split_dir / sub / "data.mdb"
            if f.is_file():
                h.update(f"{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns};".encode())
        h.update(json.dumps([self.select, self.report, [self.queries[t] for t in tids]], ensure_ascii=False).encode())
        self.key = h.hexdigest()
        log.info("validation: %d queries (%d select, %d report), %d images", len(tids), len(self.select),
                 len(self.report), self.split.num_images)


class Scorer:
    """Scores weights on the validation data with one reused model; results cached in a JSON file."""

    def __init__(self, val: ValData, config: ModelConfig, cache: dict, cache_path: Path, *, device, batch_size: int,
                 num_workers: int, precision: str, round_to: torch.dtype):
        self.val, self.config, self.cache, self.cache_path = val, config, cache, cache_path
        self.device, self.batch_size, self.num_workers, self.precision = device, batch_size, num_workers, precision
        self.round_to = round_to
        self.prefix = f"v2|{val.key}|{precision}|{torch.device(device).type}|"
        self._model = None
        self._owned = False  # the model has storage of its own (else it reads one of our buffers, or is on meta)

    def cached(self, key: str) -> dict | None:
        hit = self.cache["scores"].get(self.prefix + key)
        return None if hit is None else dict(hit, cached=True)

    @property
    def model(self):
        """cn_clip's CLIP built on the meta device: no memory and no init until weights are loaded."""
        if self._model is None:
            from cn_clip.clip.model import CLIP

            with torch.device("meta"):
                self._model = CLIP(**self.config.model_info).eval().requires_grad_(False)
            self._owned = False
        return self._model

    def release(self) -> None:
        """Drop the model (and with it any reference to our buffers)."""
        self._model, self._owned = None, False

    @torch.no_grad()
    def _load(self, source: Source) -> None:
        model = self.model
        if isinstance(source, dict) and self.device.type == "cpu" and self.round_to == torch.float32:
            model.load_state_dict(source, assign=True)  # no copy: the model reads our fp32 buffer
            self._owned = False
            return
        if not self._owned:
            model.to_empty(device=self.device)
            self._owned = True
        sd = weights_of(source)
        for k, p in model.state_dict().items():
            x = sd[k]
            if self.round_to != torch.float32:
                x = x.to(self.round_to)
            p.copy_(x)
        del sd

    def score(self, key: str, source: Source) -> dict:
        """Scores of ``source`` (rounded to the soup's dtype first, as it will be saved), cached by ``key``."""
        hit = self.cached(key)
        if hit is not None:
            return hit
        from solution.retrieval.encode import encode_images, encode_texts
        from solution.retrieval.metrics import t2i_recall

        self._load(source)
        kw = dict(batch_size=self.batch_size, device=self.device, precision=self.precision,
                  progress=sys.stderr.isatty())
        image_ids, image_feats = encode_images(self.model, self.val.split, self.config, num_workers=self.num_workers, **kw)
        tids = self.val.select + self.val.report
        feats = encode_texts(self.model, [self.val.queries[t][0] for t in tids], self.config, **kw)
        n = len(self.val.select)

        def recall(ids, f):
            return t2i_recall(f, image_feats, ids, image_ids, {t: self.val.queries[t][1] for t in ids},
                              device=self.device)

        result = recall(self.val.select, feats[:n])
        result["report"] = recall(self.val.report, feats[n:]) if self.val.report else None
        result["all"] = recall(tids, feats) if self.val.report else None  # all queries, comparable with runs
        self.cache["scores"][self.prefix + key] = result
        write_json(self.cache_path, self.cache, indent=None)
        return dict(result)


# ---------------------------------------------------------------- methods


@dataclasses.dataclass
class Soup:
    method: str
    key: str
    members: dict  # path -> weight (over original checkpoints)
    score: dict | None
    source: Source  # the weights: a path or an fp32 state (not yet rounded)
    extra: dict = dataclasses.field(default_factory=dict)


class Souper:
    """Runs the methods over scored ingredients; holds at most a few fp32 states at a time."""

    def __init__(self, config: ModelConfig, template: dict, dtype: torch.dtype, scorer: Scorer | None,
                 max_rounds: int):
        self.config, self.template, self.dtype, self.scorer = config, template, dtype, scorer
        self.dtype_name = str(dtype).replace("torch.", "")
        self.max_rounds = max_rounds
        self.out_dir: Path = Path(".")
        self.rows: list[dict] = []

    def start(self, out_dir: Path, rows: Sequence[dict]) -> None:
        """Write this method's log (starting with ``rows``) and its files in ``out_dir``."""
        self.out_dir, self.rows = out_dir, list(rows)
        out_dir.mkdir(parents=True, exist_ok=True)

    def record(self, method: str, rnd: int, members: dict, score: dict | None, kept: bool, **extra) -> None:
        self.rows.append(log_row(method, rnd, members, score, kept, **extra))
        write_jsonl(self.out_dir / LOG_NAME, self.rows)

    def _try(self, terms: Sequence[tuple[Any, float]], buf: State | None) -> tuple[str, dict, State | None]:
        """Key and score of ``sum(w * x.source)``; the weights are computed (into ``buf``) only if not cached."""
        key = recipe_key([(t.key, w) for t, w in terms], self.dtype_name)
        score = self.scorer.cached(key) if self.scorer else None
        if score is not None:
            return key, score, None
        state = mix([(t.source, w) for t, w in terms], buf if buf is not None else new_state(self.template))
        return key, (self.scorer.score(key, state) if self.scorer else None), state

    def _mix(self, terms, buf: State | None) -> State:
        return mix([(t.source, w) for t, w in terms], buf if buf is not None else new_state(self.template))

    def save(self, path: Path, soup: Soup) -> Path:
        """Write ``soup`` in the soup dtype; an in-memory state is converted in place (it is done with)."""
        state = cast_state(soup.source if isinstance(soup.source, dict) else dict(weights_of(soup.source)), self.dtype)
        recipe = {"method": soup.method, "members": list(soup.members), "weights": list(soup.members.values()),
                  **soup.extra}
        if soup.score:
            recipe["score"] = {k: soup.score.get(k) for k in ("r1", "r5", "r10", "mean_recall")}
            recipe["report"] = soup.score.get("report")
            recipe["all"] = soup.score.get("all")
        tuning = dict(self.config.tuning or {})
        if tuning.get("mode") == "lora":
            tuning["merged"] = True
        config = dataclasses.replace(self.config, tuning=tuning)
        save_checkpoint(path, state, config, name=path.stem, recipe=recipe)
        del state
        log.info("wrote %s", path)
        return path

    def greedy(self, ings: list[Ingredient]) -> Soup:
        """Model soups: best first; add each next as a running average if mean recall strictly improves."""
        order = sorted(ings, key=lambda i: (-i.score["mean_recall"], i.path))
        first = order[0]
        soup = Soup("greedy", first.key, {first.path: 1.0}, first.score, mix([(first.path, 1.0)], new_state(self.template)))
        self.record("greedy", 0, soup.members, soup.score, True)
        spare = None  # the second buffer: candidates are built here; a kept one swaps with the soup's
        for rnd, ing in enumerate(order[1:], 1):
            n = len(soup.members)
            terms = [(soup, n / (n + 1)), (_Ref(ing.key, ing.path), 1 / (n + 1))]
            key, score, state = self._try(terms, spare)
            spare = state if state is not None else spare
            members = {**{p: w * n / (n + 1) for p, w in soup.members.items()}, ing.path: 1 / (n + 1)}
            kept = score["mean_recall"] > soup.score["mean_recall"]
            self.record("greedy", rnd, members, score, kept)
            if kept:
                if state is None:  # scored from the cache: build the weights now
                    spare = self._mix(terms, spare)
                soup.source, spare = spare, soup.source
                soup.key, soup.members, soup.score = key, members, score
        return soup

    def pairwise(self, ings: list[Ingredient]) -> Soup:
        """Tianchi: merge the two best; a merge beating the worse member replaces it; else stop."""
        pool = [Soup("pairwise", i.key, {i.path: 1.0}, i.score, i.path) for i in ings]
        for rnd in range(1, self.max_rounds + 1):
            if len(pool) < 2:
                break
            pool.sort(key=lambda s: (-s.score["mean_recall"], _label(s)))
            a, b = pool[0], pool[1]
            key, score, state = self._try([(a, 0.5), (b, 0.5)], None)
            members = flatten([(a.members, 0.5), (b.members, 0.5)])
            kept = score["mean_recall"] > b.score["mean_recall"]
            self.record("pairwise", rnd, members, score, kept, pair=[_label(a), _label(b)],
                        pair_scores=[a.score["mean_recall"], b.score["mean_recall"]])
            if not kept:
                log.info("pairwise: the round-%d merge scores at or below both its members: stop", rnd)
                break
            merged = Soup("pairwise", key, members, score, state if state is not None else self._mix([(a, 0.5), (b, 0.5)], None))
            merged.source = str(self.save(self.out_dir / f"merged_round{rnd}.pt", merged))  # frees the state
            pool[1] = merged
            del state
        else:
            log.warning("pairwise: stopped after --max-rounds %d rounds", self.max_rounds)
        return max(pool, key=lambda s: s.score["mean_recall"])

    def uniform(self, ings: list[Ingredient]) -> Soup:
        n = len(ings)
        terms = [(_Ref(i.key, i.path), 1 / n) for i in ings]
        key, score, state = self._try(terms, None)
        members = {i.path: 1 / n for i in ings}
        self.record("uniform", 1, members, score, True)
        return Soup("uniform", key, members, score, state if state is not None else self._mix(terms, None))

    def interpolate(self, soup: Soup, base: Ingredient, alphas: Sequence[float]) -> Soup:
        """``alpha * soup + (1 - alpha) * base`` for each alpha; the soup itself (alpha 1) wins ties."""
        method = f"{soup.method}+interpolate"
        best, best_alpha, scratch = soup, 1.0, None
        self.record(method, 0, soup.members, soup.score, True, alpha=1.0)
        for rnd, alpha in enumerate(alphas, 1):
            terms = [(soup, alpha), (_Ref(base.key, base.path), 1 - alpha)]
            key, score, state = self._try(terms, scratch)
            scratch = state if state is not None else scratch
            members = flatten([(soup.members, alpha), ({base.path: 1.0}, 1 - alpha)])
            kept = score["mean_recall"] > best.score["mean_recall"]
            self.record(method, rnd, members, score, kept, alpha=alpha)
            if kept:
                if state is None:
                    scratch = self._mix(terms, scratch)
                old = best.source if best is not soup else None
                best = Soup(soup.method, key, members, score, scratch,
                            {"alpha": alpha, "interpolate_with": base.path})
                best_alpha, scratch = alpha, old
        log.info("%s: alpha %.3g chosen", method, best_alpha)
        return best


@dataclasses.dataclass
class _Ref:
    key: str
    source: Source


def log_row(method: str, rnd: int, members: dict, score: dict | None, kept: bool, **extra) -> dict:
    """One ``soup_log.jsonl`` line (scores are the selection part's; ``report`` the other part's)."""
    score = score or {}
    row = {"method": method, "round": rnd, "members": list(members), "weights": [float(w) for w in members.values()],
           **{k: score.get(k) for k in ("r1", "r5", "r10", "mean_recall")}, "kept": bool(kept)}
    for part in ("report", "all"):
        if score.get(part):
            row[part] = score[part]
    if score.get("cached"):
        row["cached"] = True
    row.update(extra)
    log.info("%s round %d: %d members, mean recall %s%s -> %s", method, rnd, len(members),
             _fmt(score.get("mean_recall")), " (cached)" if score.get("cached") else "", "kept" if kept else "dropped")
    return row


def _label(s: Soup) -> str:
    return s.source if isinstance(s.source, str) else f"<{s.method}>"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------- CLI


def _parse_methods(values: Sequence[str]) -> list[str]:
    out = []
    for v in values:
        for m in v.split(","):
            m = m.strip().lower()
            if not m:
                continue
            if m not in METHODS:
                raise SolutionError(f"unknown --method {m!r}; choose from {', '.join(METHODS)}")
            if m not in out:
                out.append(m)
    if not out:
        raise SolutionError("--method is empty")
    return out


def _parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise SolutionError(f"--alphas must be comma-separated numbers, got {text!r}") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise SolutionError(f"--alphas must be numbers in [0, 1], got {text!r}")
    return alphas


def _load_cache(path: Path) -> dict:
    cache = {"fingerprints": {}, "scores": {}}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            cache["fingerprints"].update(data.get("fingerprints", {}))
            cache["scores"].update(data.get("scores", {}))
        except (json.JSONDecodeError, AttributeError):
            log.warning("ignoring unreadable score cache %s", path)
    return cache


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src``, atomically (hard link, else a copy)."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solution.soup", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("ingredients")
    src.add_argument("--checkpoints", nargs="+", default=[], metavar="GLOB",
                     help="checkpoint files or quoted glob patterns (** allowed)")
    src.add_argument("--from-study", metavar="DIR", help="a search study folder: use its top trials' best.pt")
    src.add_argument("--top", type=int, default=5, help="how many complete trials --from-study takes")
    val = p.add_argument_group("scoring")
    val.add_argument("--val-data", metavar="LMDB_SPLIT", help="validation LMDB split (e.g. DIR/lmdb/valid)")
    val.add_argument("--val-texts", metavar="JSONL", help="queries + gold image_ids (MUGE *_texts.jsonl); "
                     "default: the LMDB's pairs")
    val.add_argument("--select-split", type=float, metavar="FRACTION",
                     help="choose on this fraction of the queries, report the rest")
    val.add_argument("--seed", type=int, default=0, help="seed of the --select-split draw")
    val.add_argument("--no-score", action="store_true", help="only average (uniform), score nothing")
    val.add_argument("--batch-size", type=int, default=64)
    val.add_argument("--num-workers", type=int, default=0)
    val.add_argument("--precision", choices=("fp32", "amp", "fp16", "bf16"), default="fp32")
    val.add_argument("--device", default="auto")
    how = p.add_argument_group("soup")
    how.add_argument("--method", nargs="+", default=["greedy"], help=f"one or more of {', '.join(METHODS)} "
                     "(space- or comma-separated; they share the score cache)")
    how.add_argument("--interpolate-with", metavar="CKPT", help="interpolate each soup with this checkpoint")
    how.add_argument("--alphas", default="0.25,0.5,0.75", help="soup weights tried with --interpolate-with")
    how.add_argument("--max-rounds", type=int, default=20, help="pairwise: most merge rounds")
    how.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                     help="dtype of the saved soup (auto: the ingredients' own when they share one)")
    p.add_argument("--output", required=True, metavar="DIR")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    methods = _parse_methods(args.method)
    out = Path(args.output)
    if not args.checkpoints and not args.from_study:
        raise SolutionError("give --checkpoints GLOB ... and/or --from-study DIR")
    if args.no_score and (methods != ["uniform"] or args.interpolate_with):
        raise SolutionError("--no-score works with --method uniform only (the other methods choose by score)")
    if not args.no_score and not args.val_data:
        raise SolutionError("--val-data is required to score (or use --method uniform --no-score)")
    alphas = _parse_alphas(args.alphas) if args.interpolate_with else []
    if args.max_rounds < 1:
        raise SolutionError("--max-rounds must be at least 1")

    paths = expand_checkpoints(args.checkpoints, exclude=out) if args.checkpoints else []
    if args.from_study:
        seen = {q.resolve() for q in paths}
        paths += [p for p in study_checkpoints(args.from_study, args.top) if p.resolve() not in seen]
    check_output_folder(out, methods, [*paths, args.interpolate_with], (LOG_NAME, CACHE_NAME, SUMMARY_NAME))
    val = None if args.no_score else ValData(args.val_data, args.val_texts, args.select_split, args.seed)
    cache = _load_cache(out / CACHE_NAME)

    # Every check before any work: configs and shapes (memory-mapped), fingerprints, compatibility.
    ings, duplicates, template = _gather(paths, cache["fingerprints"])
    base = None
    if args.interpolate_with:
        base = inspect_checkpoint(Path(args.interpolate_with), cache["fingerprints"])
        check_compatible(base, ings[0], template, strict=False)
    config = ings[0].config
    if len({json.dumps(i.config.tuning, sort_keys=True) for i in ings}) > 1:
        log.info("ingredients were tuned differently (full, LoRA merged, frozen towers): the soup is plain weights")
        config = dataclasses.replace(config, tuning={"mode": "full"})
    if args.dtype == "auto":
        dtypes = {i.dtype for i in ings}
        dtype = dtypes.pop() if len(dtypes) == 1 and None not in dtypes else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    log.info("%d checkpoints, %d distinct: %s, prompt %r, context length %d; soup dtype %s", len(paths), len(ings),
             config.arch, config.text_prompt, config.context_length, str(dtype).replace("torch.", ""))

    out.mkdir(parents=True, exist_ok=True)
    scorer = None
    if val is not None:
        scorer = Scorer(val, config, cache, out / CACHE_NAME, device=resolve_device(args.device),
                        batch_size=args.batch_size, num_workers=args.num_workers, precision=args.precision,
                        round_to=dtype)
    write_json(out / CACHE_NAME, cache, indent=None)
    rows = []
    souper_dtype = str(dtype).replace("torch.", "")
    if scorer:
        for ing in ings + ([base] if base else []):
            # scored as it would be saved in the soup dtype (a no-op unless --dtype narrows it)
            ing.score = scorer.score(recipe_key([(ing.key, 1.0)], souper_dtype), ing.path)
            rows.append(log_row("ingredient" if ing is not base else "base", 0, {ing.path: 1.0}, ing.score, True,
                                fingerprint=ing.fingerprint,
                                duplicates=[d for d, o in duplicates.items() if o == ing.path]))

    souper = Souper(config, template, dtype, scorer, args.max_rounds)
    results: dict[str, Soup] = {}
    for method in methods:
        mdir = out if len(methods) == 1 else out / method
        souper.start(mdir, rows)
        soup = getattr(souper, method)(ings)
        if base is not None:
            soup = souper.interpolate(soup, base, alphas)
        if scorer:
            scorer.release()
        soup.source = str(souper.save(mdir / "soup.pt", soup))  # frees the in-memory weights
        results[method] = soup
        write_json(mdir / SUMMARY_NAME, _summary(mdir, {method: soup}, ings, duplicates, args, dtype, val))
    if len(methods) > 1:
        best = max(results.values(), key=lambda s: s.score["mean_recall"]) if scorer else results[methods[0]]
        _link(Path(best.source), out / "soup.pt")
        write_json(out / SUMMARY_NAME, _summary(out, results, ings, duplicates, args, dtype, val))
    summary = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    for m, s in results.items():
        log.info("%-9s mean recall %s%s with %d members -> %s", m, _fmt((s.score or {}).get("mean_recall")),
                 f" (report {_fmt(s.score['report']['mean_recall'])})" if s.score and s.score.get("report") else "",
                 len(s.members), s.source)
    print(json.dumps({"soup": summary["soup"], "method": summary["method"],
                      **summary["soups"][summary["method"]]}, ensure_ascii=False))
    return summary


def _gather(paths: Sequence[Path], fp_cache: dict) -> tuple[list[Ingredient], dict, dict]:
    """Inspect every checkpoint (one at a time), refuse misfits, drop duplicates by fingerprint."""
    ings: list[Ingredient] = []
    template: dict = {}
    for p in paths:
        ing = inspect_checkpoint(p, fp_cache)
        if not ings:
            template = model_template(ing.config)
        check_compatible(ing, ings[0] if ings else ing, template)
        ings.append(ing)
    unique: dict[str, Ingredient] = {}
    duplicates: dict[str, str] = {}
    aliases = ("best.pt", "epoch_latest.pt")  # copies the trainer makes: keep the epoch_N.pt they copy
    for ing in ings:
        kept = unique.get(ing.fingerprint)
        if kept is None:
            unique[ing.fingerprint] = ing
            continue
        if Path(kept.path).name in aliases and Path(ing.path).name not in aliases:
            unique[ing.fingerprint] = ing  # the epoch file takes the alias's place
            for d, o in duplicates.items():
                if o == kept.path:
                    duplicates[d] = ing.path
            kept, ing = ing, kept
        duplicates[ing.path] = kept.path
        log.info("%s has the same weights as %s: used once", ing.path, kept.path)
    return list(unique.values()), duplicates, template


def _summary(folder: Path, results: dict, ings: list[Ingredient], duplicates: dict, args, dtype,
             val: ValData | None) -> dict:
    scored = [i for i in ings if i.score]
    best_single = max(scored, key=lambda i: i.score["mean_recall"]) if scored else None
    best = max(results, key=lambda m: (results[m].score or {}).get("mean_recall", 0.0))
    return {
        "soup": str(folder / "soup.pt"), "method": best,
        "soups": {m: {"checkpoint": s.source, "members": list(s.members), "weights": list(s.members.values()),
                      **s.extra, **_scores(s.score)} for m, s in results.items()},
        "best_single": {"path": best_single.path, **_scores(best_single.score)} if best_single else None,
        "ingredients": [{"path": i.path, "fingerprint": i.fingerprint, **_scores(i.score)} for i in ings],
        "duplicates": duplicates, "dtype": str(dtype).replace("torch.", ""),
        "selection": ({"fraction": args.select_split, "seed": args.seed, "select_text_ids": val.select,
                       "report_text_ids": val.report} if val else None),
    }


def _scores(score: dict | None) -> dict:
    if not score:
        return {}
    out = {k: score.get(k) for k in ("r1", "r5", "r10", "mean_recall")}
    for part in ("report", "all"):
        if score.get(part):
            out[part] = score[part]
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
