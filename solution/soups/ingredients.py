"""Soup ingredients: find checkpoints (globs, or a search study's top trials), check they belong
together, fingerprint them and use identical ones once.

Checkpoints are memory-mapped (``read_checkpoint(mmap=True)``): reading a config or the shapes
costs nothing. A fingerprint is the digest of a checkpoint's weights, memoised in the score cache
under the file's path, size and modification time.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from solution.common import SolutionError, check_output
from solution.formats.trials import NAME as TRIALS
from solution.formats.trials import completed, read_trials
from solution.model import (
    ModelConfig,
    check_finite,
    check_shapes,
    clean_state_dict,
    model_template,
    read_checkpoint,
    resolve_config,
    state_dict_digest,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- finding ingredients


def expand_checkpoints(patterns: Sequence[str], exclude: Path | None = None) -> list[Path]:
    """The files the patterns name; a glob's matches inside ``exclude`` (the output folder) are left out."""
    out: list[Path] = []
    ignored = 0
    ex = exclude.resolve() if exclude is not None else None
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        hits = [Path(h) for h in hits if Path(h).is_file()]
        if not hits:
            raise SolutionError(f"no checkpoint matches {pat!r}")
        if ex is not None and glob.has_magic(pat):
            kept = [h for h in hits if ex not in h.resolve().parents]
            ignored += len(hits) - len(kept)
            hits = kept
        out.extend(hits)
    if ignored:
        log.warning("ignoring %d matches inside the output folder %s", ignored, exclude)
        if not out:
            raise SolutionError(
                f"every checkpoint matched lies inside the output folder {exclude}: "
                "choose another --output or name the checkpoints"
            )
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def check_output_folder(
    out: Path, methods: Sequence[str], inputs: Sequence[str | Path | None], names: Sequence[str]
) -> None:
    """Refuse an ``--output`` folder the soup cannot write, or whose files would replace one of its inputs.

    ``out`` must be (or become) a folder, not under a file; with several methods each gets a
    sub-folder; ``names`` (and ``soup.pt``, ``merged_round{N}.pt``) in them must not be folders nor
    one of ``inputs``. Nothing is written.
    """
    check_output(out, inputs=inputs, what="--output", is_dir=True)
    folders = [out, *(out / m for m in methods)] if len(methods) > 1 else [out]
    for d in folders[1:]:
        check_output(d, what="--output's method folder", is_dir=True)
    for d in folders:
        for name in ("soup.pt", *names):
            check_output(d / name, inputs=inputs, what="--output's file")
    merged = (out if len(methods) == 1 else out / "pairwise").resolve() if "pairwise" in methods else None
    for src in (Path(x) for x in inputs if x is not None):
        if src.resolve().parent == merged and re.fullmatch(r"merged_round\d+\.pt", src.name):
            raise SolutionError(
                f"{src} is one of the inputs but a pairwise soup in {out} rewrites it; choose another --output"
            )


def _soupable_key(path: Path) -> tuple:
    """What ingredients must share: architecture, prompt and context length."""
    cfg = resolve_config(read_checkpoint(path, mmap=True), source=str(path))
    return cfg.arch, cfg.text_prompt, cfg.context_length


def study_checkpoints(study_dir: str | os.PathLike, top: int) -> list[Path]:
    """``checkpoints/best.pt`` of the ``top`` best complete trials of a search study folder.

    A search may vary the prompt or context length, and runs that differ in those cannot be
    averaged: the best trial sets what the others must share, and a trial that differs is
    passed over (logged) in favour of the next compatible one.
    """
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
            raise SolutionError(
                f"{table}: trial {r.get('number')!r} with value {r['value']!r}: number and value must be numbers"
            ) from None
    rows.sort(key=lambda r: (-r["value"], r["number"]))
    paths, want = [], None
    for r in rows:
        if len(paths) == top:
            break
        candidates = [Path(r["run_dir"])] if r.get("run_dir") else []
        candidates += [study_dir / (r.get("run_dir") or ""), study_dir / "trials" / f"{int(r['number']):04d}"]
        run_dir = next((c for c in candidates if (c / "checkpoints" / "best.pt").is_file()), None)
        if run_dir is None:
            raise SolutionError(f"{table}: trial {r.get('number')} has no checkpoints/best.pt")
        path = run_dir / "checkpoints" / "best.pt"
        if not paths:  # the best trial: nothing to compare with yet
            paths.append(path)
            continue
        want = want or _soupable_key(paths[0])
        key = _soupable_key(path)
        if key != want:
            log.info(
                "study %s: passing over trial %s (%s, prompt %r, context %d): the best trial has %s, prompt %r, "
                "context %d",
                study_dir,
                r.get("number"),
                *key,
                *want,
            )
            continue
        paths.append(path)
    log.info("study %s: top %d complete trials -> %s", study_dir, len(paths), ", ".join(map(str, paths)))
    return paths


@dataclasses.dataclass
class Ingredient:
    path: str
    fingerprint: str
    config: ModelConfig
    shapes: dict  # name -> tuple shape
    dtype: torch.dtype | None  # the one floating dtype of its tensors, None if mixed
    score: dict | None = None

    @property
    def key(self) -> str:
        return self.fingerprint


def inspect_checkpoint(path: Path, fp_cache: dict) -> Ingredient:
    """Config, shapes and fingerprint of one checkpoint (memory-mapped; hashed once per file version).

    The checks of :func:`solution.model.load_model` apply: architecture names in the registry,
    every tensor of that model present in its shape (no position grid resizing: weights are
    averaged as stored), and finite weights (checked when the file is hashed: a cached
    fingerprint stands for a checked file version).
    """
    ckpt = read_checkpoint(path, mmap=True)
    config = resolve_config(ckpt, source=str(path))
    sd = clean_state_dict(ckpt["state_dict"])
    lora = [k for k in sd if "lora_" in k or ".base_layer." in k]
    tuning = config.tuning or {}
    if lora or (tuning.get("mode") == "lora" and tuning.get("merged") is False):
        raise SolutionError(
            f"{path} holds unmerged LoRA weights ({lora[0] if lora else 'tuning.merged=false'}): "
            "soup the merged checkpoint the trainer saves"
        )
    check_shapes(sd, model_template(config), config, str(path))
    st = path.stat()
    ident = f"finite|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    fp = fp_cache.get(ident)
    if fp is None:
        check_finite(sd, str(path))
        fp = state_dict_digest(sd)
    fp_cache[ident] = fp
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    ing = Ingredient(
        str(path), fp, config, {k: tuple(t.shape) for k, t in sd.items()}, dtypes.pop() if len(dtypes) == 1 else None
    )
    del ckpt, sd
    return ing


def check_compatible(ing: Ingredient, ref: Ingredient, template: dict, *, strict: bool = True) -> None:
    """Refuse an ingredient whose architecture (or, when ``strict``, prompt/context length) differs.

    Each ingredient's shapes were checked against its own config by :func:`inspect_checkpoint`;
    ``template`` (the soup's tensors) guards what the soup itself will hold.
    """
    what = "ingredients must share architecture, prompt and context length"
    if ing.config.arch != ref.config.arch or ing.config.model_info != ref.config.model_info:
        raise SolutionError(f"{ing.path} is a {ing.config.arch} model but {ref.path} is {ref.config.arch}: {what}")
    for name in ("text_prompt", "context_length"):
        a, b = getattr(ing.config, name), getattr(ref.config, name)
        if a != b:
            if strict:
                raise SolutionError(f"{ing.path} has {name} {a!r} but {ref.path} has {b!r}: {what}")
            log.warning("%s has %s %r, the soup %r: the soup keeps its own", ing.path, name, a, b)
    for k, shape in template.items():
        if ing.shapes.get(k) != shape:
            got = "missing" if k not in ing.shapes else f"shape {ing.shapes[k]}"
            raise SolutionError(f"{ing.path}: tensor {k} is {got}, expected {shape} as in {ref.path}: {what}")


ALIASES = ("best.pt", "epoch_latest.pt")  # copies the trainer makes: keep the epoch_N.pt they copy


def _dedupe(ings: Sequence[Ingredient]) -> tuple[list[Ingredient], dict[str, str]]:
    """Ingredients with distinct weights, and ``{duplicate path: the path used}``."""
    unique: dict[str, Ingredient] = {}
    duplicates: dict[str, str] = {}
    for ing in ings:
        kept = unique.get(ing.fingerprint)
        if kept is None:
            unique[ing.fingerprint] = ing
            continue
        if Path(kept.path).name in ALIASES and Path(ing.path).name not in ALIASES:
            unique[ing.fingerprint] = ing  # the epoch file takes the alias's place
            for d, o in duplicates.items():
                if o == kept.path:
                    duplicates[d] = ing.path
            kept, ing = ing, kept
        duplicates[ing.path] = kept.path
        log.info("%s has the same weights as %s: used once", ing.path, kept.path)
    return list(unique.values()), duplicates


def gather(paths: Sequence[Path], fp_cache: dict) -> tuple[list[Ingredient], dict[str, str], dict]:
    """Inspect every checkpoint (one at a time), refuse misfits, use duplicates once:
    ``(ingredients, {duplicate: kept}, the soup's tensor template)``."""
    ings: list[Ingredient] = []
    template: dict = {}
    for p in paths:
        ing = inspect_checkpoint(p, fp_cache)
        if not ings:
            template = model_template(ing.config)
        check_compatible(ing, ings[0] if ings else ing, template)
        ings.append(ing)
    unique, duplicates = _dedupe(ings)
    return unique, duplicates, template
