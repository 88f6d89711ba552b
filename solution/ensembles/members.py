"""Ensemble members: a checkpoint each, encoding queries with its own config and the gallery through the cache.

A member is fingerprinted as a soup ingredient is (:func:`solution.soups.ingredients.inspect_checkpoint`:
the digest of its weights), loaded with :func:`solution.model.load_model` and encoded with its own
prompt, context length and resolution (:mod:`solution.retrieval.encode`); its gallery features come
from the image-feature cache (:mod:`solution.retrieval.cache`). Members may differ in architecture
and embedding width: fusion works on scores, never on features. Flip test-time augmentation
(``tta = "flip"``) ranks against each member's gallery averaged with the features of the horizontally
flipped images (cached under their own key), L2-normalised again (:func:`flip_average`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cn_clip_patch.prompt import PromptError, check_prompt
from solution.common import SolutionError
from solution.data.lmdb_io import LMDBSplit
from solution.model import ModelConfig, load_model
from solution.retrieval.cache import cached_image_features
from solution.retrieval.encode import encode_texts
from solution.soups.ingredients import inspect_checkpoint

log = logging.getLogger(__name__)

TTAS = ("none", "flip")


@dataclasses.dataclass
class Member:
    """One encoded member: ``queries [Q, D]`` and ``bank [B, D]`` (texts) against ``gallery [G, D]`` (images)."""

    path: str
    fingerprint: str
    config: ModelConfig
    gallery_ids: np.ndarray
    gallery: np.ndarray
    queries: np.ndarray
    bank: np.ndarray | None = None
    cache: str = "off"
    flipped: np.ndarray | None = None  # features of the flipped gallery images (flip TTA), same ids
    flip_cache: str | None = None

    def gallery_for(self, tta: str) -> np.ndarray:
        """The gallery features ranked under test-time augmentation ``tta`` (``none`` or ``flip``)."""
        if tta == "none":
            return self.gallery
        if tta != "flip" or self.flipped is None:
            raise SolutionError(f"member {self.path}: no {tta!r} gallery features encoded")
        return flip_average(self.gallery, self.flipped)

    def record(self) -> dict:
        """What ``ensemble.json`` says about the member (its weights by fingerprint, and how it encodes)."""
        c = self.config
        return {
            "path": str(Path(self.path).resolve()),
            "fingerprint": self.fingerprint,
            "arch": c.arch,
            "vision_model": c.vision_model,
            "text_model": c.text_model,
            "context_length": c.context_length,
            "text_prompt": c.text_prompt,
            "image_resolution": c.image_resolution,
            "embed_dim": int(c.model_info["embed_dim"]),
        }


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How members encode: device, precision, batch size, and the image-feature cache folder (None: off)."""

    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 64
    cache_dir: str | None = None


def flip_average(plain: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """Flip TTA of L2-normalised image features: ``plain + flipped``, L2-normalised again (float32)."""
    s = np.asarray(plain, dtype=np.float32) + np.asarray(flipped, dtype=np.float32)
    return s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), np.float32(1e-12))


def fingerprint(path: str) -> str:
    """The digest of a member's weights (checked as a soup ingredient is: shapes, finite, merged LoRA)."""
    try:
        return inspect_checkpoint(Path(path), {}).fingerprint
    except SolutionError as e:
        raise SolutionError(f"member {path}: {e}") from None
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise SolutionError(f"member {path} is not a readable checkpoint: {e}") from None


def verify_fingerprint(record: dict) -> None:
    """Refuse a member whose file no longer holds the weights the ensemble was selected with."""
    path = record["path"]
    if not Path(path).is_file():
        raise SolutionError(f"ensemble member {path} is missing")
    got = fingerprint(path)
    if got != record["fingerprint"]:
        raise SolutionError(
            f"ensemble member {path} changed since selection (fingerprint {got[:12]} != "
            f"{record['fingerprint'][:12]}): select the ensemble again"
        )


def encode_member(
    path: str,
    split: LMDBSplit,
    texts: Sequence[str],
    enc: Encoding,
    *,
    bank_texts: Sequence[str] | None = None,
    known_fingerprint: str | None = None,
    flip: bool = False,
) -> Member:
    """Load ``path`` and encode the split's gallery (cached), the query ``texts`` and the ``bank_texts``.

    ``known_fingerprint``: the digest already checked by :func:`verify_fingerprint` (not hashed again).
    ``flip``: also the gallery's flipped images (cached under their own key), for flip TTA.
    """
    fp = known_fingerprint or fingerprint(path)
    try:
        model, config, _ = load_model(path, device=enc.device)
        check_prompt(config.text_prompt, config.context_length)
        kw = dict(device=enc.device, precision=enc.precision, batch_size=enc.batch_size)
        ids, gallery, info = cached_image_features(model, split, config, cache_dir=enc.cache_dir, **kw)
        queries = encode_texts(model, texts, config, **kw)
        bank = encode_texts(model, bank_texts, config, **kw) if bank_texts is not None else None
        fids, flipped, finfo = (
            cached_image_features(model, split, config, cache_dir=enc.cache_dir, flip=True, **kw)
            if flip
            else (ids, None, {"cache": None})
        )
        if not np.array_equal(fids, ids):
            raise SolutionError(f"its flipped images decode as {len(fids)} images, not {len(ids)}")
    except (SolutionError, PromptError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise SolutionError(f"member {path} cannot encode {split.split_dir}: {e}") from None
    log.info(
        "member %s (%s, %d-d): %d queries, %d images (cache %s%s)",
        path,
        config.arch,
        gallery.shape[1],
        len(queries),
        len(ids),
        info["cache"],
        f", flipped: {finfo['cache']}" if flip else "",
    )
    return Member(str(path), fp, config, ids, gallery, queries, bank, info["cache"], flipped, finfo["cache"])


def check_galleries(members: Sequence[Member]) -> np.ndarray:
    """The gallery ids every member shares, in the same order; refuse members whose galleries differ."""
    ref = members[0]
    for m in members[1:]:
        if not np.array_equal(m.gallery_ids, ref.gallery_ids):
            only = sorted(set(m.gallery_ids.tolist()) ^ set(ref.gallery_ids.tolist()))
            what = f"ids only one holds: {only[:5]}" if only else "the same ids in another order"
            raise SolutionError(
                f"members {ref.path} and {m.path} hold different galleries "
                f"({len(ref.gallery_ids)} vs {len(m.gallery_ids)} images; {what})"
            )
    return ref.gallery_ids
