"""Soup ingredients: find checkpoints (globs, or a search study's top trials), check they belong together,
fingerprint them by content (memory-mapped, one at a time) and use identical ones once."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from solution.common import SolutionError
from solution.formats.run_files import BEST_CHECKPOINT, LATEST_CHECKPOINT
from solution.formats.trials import NAME as TRIALS
from solution.formats.trials import completed, read_trials, run_dirs
from solution.model import (
    ModelConfig,
    check_finite,
    check_shapes,
    clean_state_dict,
    fingerprint,
    model_template,
    read_checkpoint,
    refuse_unmerged_lora,
    resolve_config,
)

log = logging.getLogger(__name__)

ALIASES = (Path(BEST_CHECKPOINT).name, Path(LATEST_CHECKPOINT).name)  # the trainer's copies of an epoch file


def expand_checkpoints(patterns: Sequence[str], exclude: Path) -> list[Path]:
    """The files the patterns name, each once; a glob's matches inside ``exclude`` (the output folder) are left out."""
    out: list[Path] = []
    for pat in patterns:
        hits = [Path(h) for h in sorted(glob.glob(os.path.expanduser(pat), recursive=True)) if Path(h).is_file()]
        if not hits:
            raise SolutionError(f"no checkpoint matches {pat!r}")
        kept = [h for h in hits if not glob.has_magic(pat) or exclude.resolve() not in h.resolve().parents]
        if len(kept) < len(hits):
            log.warning("%r: ignoring %d matches inside the output folder %s", pat, len(hits) - len(kept), exclude)
        out.extend(kept)
    if not out:
        raise SolutionError(f"every checkpoint matched lies inside the output folder {exclude}")
    unique: dict[Path, Path] = {}
    for p in out:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _soupable_key(path: Path) -> tuple:
    """What ingredients must share: architecture, prompt and context length."""
    cfg = resolve_config(read_checkpoint(path, mmap=True), source=str(path))
    return cfg.arch, cfg.text_prompt, cfg.context_length


def study_checkpoints(study_dir: str | os.PathLike, top: int) -> list[Path]:
    """``best.pt`` of a search study's ``top`` best complete trials; one that does not fit the best is passed over."""
    study_dir = Path(study_dir)
    table = study_dir / TRIALS
    if not table.is_file():
        raise SolutionError(f"{study_dir} is not a search study folder (no {TRIALS})")
    rows = [r for r in completed(read_trials(table)) if str(r.get("value") or "").strip() not in ("", "nan", "None")]
    if not rows:
        raise SolutionError(f"{table} lists no complete trial")
    for r in rows:
        try:
            r["value"], r["number"] = float(r["value"]), int(float(r.get("number") or 0))
        except ValueError:
            raise SolutionError(f"{table}: trial {r.get('number')!r}: number and value must be numbers") from None
    paths: list[Path] = []
    for r in sorted(rows, key=lambda r: (-r["value"], r["number"])):
        if len(paths) == top:
            break
        path = next((d / BEST_CHECKPOINT for d in run_dirs(study_dir, r) if (d / BEST_CHECKPOINT).is_file()), None)
        if path is None:
            raise SolutionError(f"{table}: trial {r['number']} has no {BEST_CHECKPOINT}")
        if paths and (key := _soupable_key(path)) != (want := _soupable_key(paths[0])):
            log.info("study %s: passing over trial %s (%s): the best trial has %s", study_dir, r["number"], key, want)
            continue
        paths.append(path)
    log.info("study %s: top %d complete trials -> %s", study_dir, len(paths), ", ".join(map(str, paths)))
    return paths


@dataclasses.dataclass
class Ingredient:
    path: str
    key: str  # the content fingerprint (its identity as a term of a candidate)
    config: ModelConfig
    dtype: torch.dtype | None  # the one floating dtype of its tensors, None if mixed
    score: dict | None = None

    @property
    def source(self) -> str:
        return self.path


def inspect_checkpoint(path: Path) -> Ingredient:
    """Config and content fingerprint of a checkpoint whose weights fit its model as stored: finite, no LoRA left."""
    ckpt = read_checkpoint(path, mmap=True)
    config = resolve_config(ckpt, source=str(path))
    sd = clean_state_dict(ckpt["state_dict"])
    refuse_unmerged_lora(config, sd, str(path))
    check_shapes(sd, model_template(config), config, str(path))
    check_finite(sd, str(path))
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    return Ingredient(str(path), fingerprint(ckpt), config, dtypes.pop() if len(dtypes) == 1 else None)


def check_compatible(ing: Ingredient, ref: Ingredient, *, strict: bool = True) -> None:
    """Refuse an ingredient whose architecture (or, when ``strict``, prompt/context length) differs."""
    what = "ingredients must share architecture, prompt and context length"
    if ing.config.arch != ref.config.arch or ing.config.model_info != ref.config.model_info:
        raise SolutionError(f"{ing.path} is a {ing.config.arch} model but {ref.path} is {ref.config.arch}: {what}")
    for name in ("text_prompt", "context_length"):
        a, b = getattr(ing.config, name), getattr(ref.config, name)
        if a != b and strict:
            raise SolutionError(f"{ing.path} has {name} {a!r} but {ref.path} has {b!r}: {what}")
        if a != b:
            log.warning("%s has %s %r, the soup %r: the soup keeps its own", ing.path, name, a, b)


def gather(paths: Sequence[Path]) -> tuple[list[Ingredient], dict[str, str]]:
    """``(distinct ingredients, {duplicate: the path used})``, misfits refused; an epoch file kept over its aliases."""
    groups: dict[str, list[Ingredient]] = {}
    for p in paths:
        ing = inspect_checkpoint(p)
        check_compatible(ing, next(iter(groups.values()), [ing])[0])
        groups.setdefault(ing.key, []).append(ing)
    unique, duplicates = [], {}
    for group in groups.values():
        kept = next((i for i in group if Path(i.path).name not in ALIASES), group[0])
        unique.append(kept)
        for ing in group:
            if ing is not kept:
                duplicates[ing.path] = kept.path
                log.info("%s has the same weights as %s: used once", ing.path, kept.path)
    return unique, duplicates
