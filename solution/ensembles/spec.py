"""An ensemble's members and its ``ensemble.json``.

A member is a checkpoint read and checked (:func:`open_member`), then encoded (:func:`encode_member`): its queries
with its own config, its gallery through the image-feature cache (members may differ in architecture and width:
fusion works on scores). ``ensemble.json`` holds ``members`` (:func:`member_record`), ``weights``, ``norm`` (+
``norm_temperature``), ``tta``, ``rerank`` {method, temperature, bank, bank_sha256, bank_topk}, ``precision``,
``scores``, ``crossfit``, ``hits`` (files relative to the folder) and how it was made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cn_clip_patch.prompt import PromptError, check_prompt
from solution.common import SolutionError, write_json
from solution.data.lmdb_io import LMDBSplit
from solution.ensembles.fusion import NORMS, RERANKERS, check_weights
from solution.formats.kinds import ENSEMBLE_SPEC
from solution.model import ModelConfig, build_model, fingerprint, load_weights, read_checkpoint, resolve_config
from solution.retrieval.encode import encode_texts
from solution.retrieval.extract import cached_image_features

log = logging.getLogger(__name__)

TTAS = ("none", "flip")


@dataclasses.dataclass
class Member:
    """A member read and checked (:func:`open_member`), then encoded (:func:`encode_member`): ``queries [Q, D]``
    and ``bank [B, D]`` (texts) against ``gallery [G, D]`` (images)."""

    path: str
    ckpt: dict | None  # until encoded
    config: ModelConfig
    record: dict
    gallery_ids: np.ndarray | None = None
    gallery: np.ndarray | None = None
    queries: np.ndarray | None = None
    bank: np.ndarray | None = None
    cache: str = "off"
    flipped: np.ndarray | None = None  # flip TTA's gallery: plain + mirrored images' features, unit length
    flip_cache: str | None = None


def flip_average(plain: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    s = np.asarray(plain, dtype=np.float32) + np.asarray(flipped, dtype=np.float32)
    return s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), np.float32(1e-12))


def member_record(path: str, ckpt: dict, config: ModelConfig) -> dict:
    """What ``ensemble.json`` says about a member: its weights' fingerprint and everything that changes its
    features (``config_sha256``: the config without its tuning record)."""
    features = {k: v for k, v in config.to_dict().items() if k != "tuning"}
    return {
        "path": str(Path(path).resolve()),
        "fingerprint": fingerprint(ckpt),
        "arch": config.arch,
        **{k: getattr(config, k) for k in ("vision_model", "text_model", "context_length", "text_prompt")},
        "image_resolution": config.image_resolution,
        "embed_dim": int(config.model_info["embed_dim"]),
        "config_sha256": hashlib.sha256(json.dumps(features, sort_keys=True).encode()).hexdigest(),
    }


def open_member(path: str, context_length: int | None = None, recorded: dict | None = None) -> Member:
    """Read and check a member before any model is built; ``recorded``: its ``ensemble.json`` entry, which every
    field of its record must still match. ``context_length``: for a checkpoint without a stored config."""
    try:
        ckpt = read_checkpoint(path)
        if set(ckpt) == {"state_dict"} and context_length is None:
            raise SolutionError("it holds bare weights: its context length cannot be known; pass --context-length")
        config = resolve_config(ckpt, source=str(path), context_length=None if ckpt.get("config") else context_length)
        if config.tuning.get("mode") == "lora" and config.tuning.get("merged") is False:
            raise SolutionError("it holds unmerged LoRA weights (tuning.merged=false): use the merged checkpoint")
        check_prompt(config.text_prompt, config.context_length)
    except (SolutionError, PromptError) as e:
        raise SolutionError(f"member {path}: {e}") from None
    record = member_record(path, ckpt, config)
    changed = [k for k, v in (recorded or {}).items() if k in record and k != "path" and record[k] != v]
    if changed:
        what = ", ".join("its weights" if k == "fingerprint" else k for k in changed)
        raise SolutionError(f"ensemble member {path} changed since selection ({what}): select the ensemble again")
    return Member(str(path), ckpt, config, record)


def encode_member(m: Member, split: LMDBSplit, texts: Sequence[str], *, cache_dir, bank_texts=None, flip=False, **kw):
    """Encode the split's gallery (through the cache in ``cache_dir``; ``flip``: its mirrored images too, under their
    own key), the query ``texts`` and the ``bank_texts`` into ``m``; ``kw``: ``device``, ``precision``, ``batch_size``."""
    try:
        model = build_model(m.config)
        load_weights(model, m.ckpt["state_dict"], m.config, m.path)
        model.to(kw["device"])
        m.gallery_ids, m.gallery, info = cached_image_features(model, split, m.config, cache_dir=cache_dir, **kw)
        m.cache = info["cache"]
        if flip:
            ids, flipped, info = cached_image_features(model, split, m.config, cache_dir=cache_dir, flip=True, **kw)
            if not np.array_equal(ids, m.gallery_ids):
                raise SolutionError(f"its flipped images decode as {len(ids)} images, not {len(m.gallery_ids)}")
            m.flipped, m.flip_cache = flip_average(m.gallery, flipped), info["cache"]
        m.queries = encode_texts(model, texts, m.config, **kw)
        m.bank = encode_texts(model, bank_texts, m.config, **kw) if bank_texts is not None else None
    except (SolutionError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise SolutionError(f"member {m.path} cannot encode {split.split_dir}: {e}") from None
    m.ckpt = None
    log.info(f"member {m.path}: {len(m.queries)} queries, {len(m.gallery_ids)} images ({m.cache}, flip {m.flip_cache})")
    return m


def encode_members(members: Sequence[Member], split: LMDBSplit, texts: Sequence[str], **kw) -> np.ndarray:
    """:func:`encode_member` for each; the gallery ids they share, in the same order (members that differ refused)."""
    for m in members:
        encode_member(m, split, texts, **kw)
        if not np.array_equal(m.gallery_ids, members[0].gallery_ids):
            raise SolutionError(
                f"members {members[0].path} and {m.path} hold different galleries ({len(members[0].gallery_ids)} "
                f"vs {len(m.gallery_ids)} images, or the same ids in another order)"
            )
    return members[0].gallery_ids


NAME, LOG_NAME = ENSEMBLE_SPEC, "ensemble_log.jsonl"
VERSION = 1
RERANK = {"method": "none", "temperature": 0.0, "bank": None, "bank_topk": None}


def write_ensemble(path: str | os.PathLike, spec: dict) -> None:
    write_json(path, {"version": VERSION, **spec})


def _number(x, low: float = 0.0) -> bool:
    """A finite number ``>= low`` (``> 0`` when ``low`` is None)."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return ok and (x > 0 if low is None else x >= low)


def read_ensemble(path: str | os.PathLike) -> dict:
    """A checked ``ensemble.json``, defaults filled in; one error line for anything it cannot be."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise SolutionError(f"ensemble file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SolutionError(f"{path} is not a readable ensemble.json: {e}") from None
    if not isinstance(spec, dict) or spec.get("version", VERSION) != VERSION:
        version = spec.get("version") if isinstance(spec, dict) else None
        raise SolutionError(f"{path}: unknown ensemble.json version {version!r} (this toolkit reads {VERSION})")
    members = spec.get("members") if isinstance(spec.get("members"), list) else []
    if not members or not all(
        isinstance(m, dict) and isinstance(m.get("path"), str) and m.get("fingerprint") for m in members
    ):
        raise SolutionError(f"{path}: it needs members, each with a path and a fingerprint")
    try:
        spec["weights"] = check_weights(spec.get("weights"), len(members)).tolist()
    except (ValueError, TypeError) as e:
        raise SolutionError(f"{path}: {e}") from None
    if not isinstance(spec.get("rerank") or {}, dict):
        raise SolutionError(f"{path}: rerank must be an object {{method, temperature, ...}}, got {spec['rerank']!r}")
    rr = spec["rerank"] = {**RERANK, **(spec.get("rerank") or {})}
    norm, t, topk, spec["tta"] = spec.get("norm"), rr["temperature"], rr["bank_topk"], spec.get("tta") or "none"
    for bad, what in (
        (norm not in NORMS, f"unknown normalisation {norm!r}"),
        (norm == "softmax" and not _number(spec.get("norm_temperature"), None), "softmax needs a norm_temperature > 0"),
        (rr["method"] not in RERANKERS, f"unknown re-ranker {rr['method']!r}"),
        (not _number(t), f"the re-ranking temperature must be a number >= 0, got {t!r}"),
        (
            topk is not None and not (isinstance(topk, int) and _number(topk, 1)),
            f"bank_topk {topk!r} is not an int >= 1",
        ),
        (rr["method"] == "qb_norm" and t != 0 and not isinstance(rr["bank"], str), "qb_norm needs its bank (JSONL)"),
        (spec["tta"] not in TTAS, f"unknown test-time augmentation {spec['tta']!r}; choose from {', '.join(TTAS)}"),
    ):
        if bad:
            raise SolutionError(f"{path}: {what}")
    return spec
