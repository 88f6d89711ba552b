"""Soup ingredients: find checkpoints, check they belong together, fingerprint them, and stream
weighted sums of their weights.

Checkpoints are memory-mapped (``read_checkpoint(mmap=True)``): reading a config or the shapes
costs nothing, and a weighted sum reads one checkpoint at a time into one fp32 buffer, so memory
stays bounded whatever the number of ingredients. Used by :mod:`solution.soup`.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence, Union

import torch

from .common import SolutionError
from .models import ModelConfig, clean_state_dict, read_checkpoint, resolve_config, state_dict_digest

log = logging.getLogger(__name__)

State = dict  # name -> fp32 tensor
Source = Union[str, State]  # a checkpoint path (streamed) or weights in memory


# ---------------------------------------------------------------- finding ingredients


def expand_checkpoints(patterns: Sequence[str], exclude: Path | None = None) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        hits = [h for h in hits if Path(h).is_file()]
        if not hits:
            raise SolutionError(f"no checkpoint matches {pat!r}")
        out.extend(Path(h) for h in hits)
    if exclude is not None:
        ex = exclude.resolve()
        kept = [p for p in out if ex not in p.resolve().parents]
        if len(kept) < len(out):
            log.warning("ignoring %d matches inside the output folder %s", len(out) - len(kept), exclude)
        out = kept
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


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
    with open(table, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if str(r.get("state", "")).upper().endswith("COMPLETE")
                and str(r.get("value", "")).strip() not in ("", "nan", "None")]
    if not rows:
        raise SolutionError(f"{table} lists no complete trial")
    rows.sort(key=lambda r: (-float(r["value"]), int(r.get("number") or 0)))
    paths, want = [], None
    for r in rows:
        if len(paths) == top:
            break
        candidates = [Path(r["run_dir"])] if r.get("run_dir") else []
        candidates += [study_dir / r.get("run_dir", ""), study_dir / "trials" / f"{int(r['number']):04d}"]
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
    """Config, shapes and fingerprint of one checkpoint (memory-mapped; hashed once per file version)."""
    ckpt = read_checkpoint(path, mmap=True)
    config = resolve_config(ckpt, source=str(path))
    sd = clean_state_dict(ckpt["state_dict"])
    lora = [k for k in sd if "lora_" in k or ".base_layer." in k]
    tuning = config.tuning or {}
    if lora or (tuning.get("mode") == "lora" and tuning.get("merged") is False):
        raise SolutionError(f"{path} holds unmerged LoRA weights ({lora[0] if lora else 'tuning.merged=false'}): "
                            "soup the merged checkpoint the trainer saves")
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    fp = fp_cache.get(ident) or state_dict_digest(sd)
    fp_cache[ident] = fp
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    ing = Ingredient(str(path), fp, config, {k: tuple(t.shape) for k, t in sd.items()},
                     dtypes.pop() if len(dtypes) == 1 else None)
    del ckpt, sd
    return ing


def check_compatible(ing: Ingredient, ref: Ingredient, template: dict, *, strict: bool = True) -> None:
    """Refuse an ingredient whose architecture (or, when ``strict``, prompt/context length) differs."""
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


def model_template(config: ModelConfig) -> dict:
    """Names and shapes of the tensors of ``config``'s model (built on the meta device: no memory)."""
    from cn_clip.clip.model import CLIP

    with torch.device("meta"):
        model = CLIP(**config.model_info)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
