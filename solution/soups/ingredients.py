"""Soup ingredients: find checkpoints, check they belong together, fingerprint them, and stream
weighted sums of their weights.

Checkpoints are memory-mapped (``read_checkpoint(mmap=True)``): reading a config or the shapes
costs nothing, and a weighted sum reads one checkpoint at a time into one fp32 buffer, so memory
stays bounded whatever the number of ingredients. Used by :mod:`solution.soup`.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence, Union

import torch

from solution.common import SolutionError, check_output
from solution.model.models import (ModelConfig, check_finite, check_shapes, clean_state_dict, model_template, read_checkpoint,
                     resolve_config, state_dict_digest)

log = logging.getLogger(__name__)

State = dict  # name -> fp32 tensor
Source = Union[str, State]  # a checkpoint path (streamed) or weights in memory


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
            raise SolutionError(f"every checkpoint matched lies inside the output folder {exclude}: "
                                "choose another --output or name the checkpoints")
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def check_output_folder(out: Path, methods: Sequence[str], inputs: Sequence[str | Path | None],
                        names: Sequence[str]) -> None:
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
            raise SolutionError(f"{src} is one of the inputs but a pairwise soup in {out} rewrites it; "
                                "choose another --output")


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
    table = study_dir / "trials.csv"
    if not table.is_file():
        raise SolutionError(f"{study_dir} is not a search study folder (no trials.csv)")
    from solution.report.compare import read_csv

    rows = [r for r in read_csv(table) if str(r.get("state", "")).upper().endswith("COMPLETE")
            and str(r.get("value", "")).strip() not in ("", "nan", "None")]
    if not rows:
        raise SolutionError(f"{table} lists no complete trial")
    for r in rows:
        try:
            r["value"], r["number"] = float(r["value"]), int(float(r.get("number") or 0))
        except ValueError:
            raise SolutionError(f"{table}: trial {r.get('number')!r} with value {r['value']!r}: "
                                "number and value must be numbers") from None
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
            log.info("study %s: passing over trial %s (%s, prompt %r, context %d): the best trial has %s, prompt %r, "
                     "context %d", study_dir, r.get("number"), *key, *want)
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

    The checks of :func:`solution.models.load_model` apply: architecture names in the registry,
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
        raise SolutionError(f"{path} holds unmerged LoRA weights ({lora[0] if lora else 'tuning.merged=false'}): "
                            "soup the merged checkpoint the trainer saves")
    check_shapes(sd, model_template(config), config, str(path))
    st = path.stat()
    ident = f"finite|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    fp = fp_cache.get(ident)
    if fp is None:
        check_finite(sd, str(path))
        fp = state_dict_digest(sd)
    fp_cache[ident] = fp
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    ing = Ingredient(str(path), fp, config, {k: tuple(t.shape) for k, t in sd.items()},
                     dtypes.pop() if len(dtypes) == 1 else None)
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


# ---------------------------------------------------------------- streaming weights


def weights_of(source: Source) -> dict:
    if isinstance(source, dict):
        return source
    return clean_state_dict(read_checkpoint(source, mmap=True)["state_dict"])


def new_state(template: dict) -> State:
    return {k: torch.empty(shape, dtype=torch.float32) for k, shape in template.items()}


@torch.no_grad()
def mix(terms: Sequence[tuple[Source, float]], out: State) -> State:
    """``out = sum(w * source)`` in fp32, one checkpoint in memory at a time (paths are memory-mapped)."""
    for i, (source, w) in enumerate(terms):
        sd = weights_of(source)
        for k, t in out.items():
            x = sd[k].to(torch.float32)
            if i == 0:
                torch.mul(x, w, out=t)
            else:
                t.add_(x, alpha=w)
        del sd
    return out


def cast_state(state: dict, dtype: torch.dtype) -> dict:
    """``state`` in ``dtype``, converted tensor by tensor in place so two full copies never coexist."""
    for k in list(state):
        if state[k].is_floating_point() and state[k].dtype != dtype:
            state[k] = state[k].to(dtype)
    return state


def recipe_key(terms: Sequence[tuple[str, float]], dtype: str) -> str:
    """Identity of a candidate: the keys of its sources and their weights, in order, and its dtype."""
    blob = json.dumps({"terms": [[k, round(float(w), 12)] for k, w in terms], "dtype": dtype})
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def flatten(parts: Sequence[tuple[dict, float]]) -> dict:
    """Weights over original checkpoints of a weighted sum of soups ``{path: weight}``."""
    out: dict = {}
    for members, w in parts:
        for p, v in members.items():
            out[p] = out.get(p, 0.0) + w * v
    return out
