"""Ensemble members: a checkpoint each, encoding the queries with its own config and the gallery through the
image-feature cache (members may differ in architecture and width: fusion works on scores). Flip TTA ranks
against each gallery averaged with its horizontally flipped images' features (:func:`flip_average`).
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
from solution.model import ModelConfig, fingerprint, load_model
from solution.retrieval.cache import cached_image_features
from solution.retrieval.encode import encode_texts

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
    flipped: np.ndarray | None = None  # the flipped gallery images' features (flip TTA), same ids
    flip_cache: str | None = None

    def gallery_for(self, tta: str) -> np.ndarray:
        """The gallery features ranked under test-time augmentation ``tta``."""
        if tta == "none":
            return self.gallery
        if tta != "flip" or self.flipped is None:
            raise SolutionError(f"member {self.path}: no {tta!r} gallery features encoded")
        return flip_average(self.gallery, self.flipped)

    def record(self) -> dict:
        """What ``ensemble.json`` says about the member."""
        c = self.config
        return {
            "path": str(Path(self.path).resolve()),
            "fingerprint": self.fingerprint,
            "arch": c.arch,
            **{k: getattr(c, k) for k in ("vision_model", "text_model", "context_length", "text_prompt")},
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


def verify_fingerprint(record: dict) -> None:
    """Refuse a member whose file no longer holds the weights the ensemble was selected with."""
    path = record["path"]
    if not Path(path).is_file():
        raise SolutionError(f"ensemble member {path} is missing")
    try:
        got = fingerprint(path)
    except SolutionError as e:
        raise SolutionError(f"member {path}: {e}") from None
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
    flip: bool = False,
    known_fingerprint: str | None = None,
) -> Member:
    """Load ``path`` (checked) and encode the split's gallery (cached; ``flip``: its flipped images too, under
    their own key), the query ``texts`` and the ``bank_texts``; ``known_fingerprint``: verified already."""
    try:
        model, config, ckpt = load_model(path, device=enc.device)
        if config.tuning.get("mode") == "lora" and config.tuning.get("merged") is False:
            raise SolutionError("it holds unmerged LoRA weights (tuning.merged=false): use the merged checkpoint")
        check_prompt(config.text_prompt, config.context_length)
        kw = dict(device=enc.device, precision=enc.precision, batch_size=enc.batch_size)
        ids, gallery, info = cached_image_features(model, split, config, cache_dir=enc.cache_dir, **kw)
        fids, flipped, finfo = ids, None, {"cache": None}
        if flip:
            fids, flipped, finfo = cached_image_features(model, split, config, cache_dir=enc.cache_dir, flip=True, **kw)
        if not np.array_equal(fids, ids):
            raise SolutionError(f"its flipped images decode as {len(fids)} images, not {len(ids)}")
        queries = encode_texts(model, texts, config, **kw)
        bank = encode_texts(model, bank_texts, config, **kw) if bank_texts is not None else None
    except (SolutionError, PromptError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise SolutionError(f"member {path} cannot encode {split.split_dir}: {e}") from None
    caches = f"{info['cache']}, flipped {finfo['cache']}" if flip else info["cache"]
    log.info(f"member {path} ({config.arch}): {len(queries)} queries, {len(ids)} images (cache {caches})")
    fp = known_fingerprint or fingerprint(ckpt)
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
