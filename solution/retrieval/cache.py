"""The image-feature cache: a gallery encoded once per vision tower, image LMDB and precision.

An entry is a feature file ``img_KEY.npy`` (+ ids, meta) in the cache folder; the key hashes the vision
tower's weights, the LMDB's content digest, the vision config, the effective precision and device type,
and ``flip`` for mirrored images. An unreadable entry is encoded again. The CLIs default the folder to
``$SOLUTION_CACHE_DIR`` (read there) or ``~/.cache/cnclip-solution/image_feats``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from solution.data.lmdb_io import LMDBSplit
from solution.formats.feature_files import feature_paths, save_features
from solution.model import ModelConfig, state_dict_digest
from solution.model.precision import effective_precision

from .encode import encode_images

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_DIR_ENV = "SOLUTION_CACHE_DIR"


def cache_dir_default(environ: Mapping[str, str]) -> Path:
    """The cache folder a CLI defaults to, given its environment."""
    return Path(environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "cnclip-solution" / "image_feats")


def image_cache_key(
    model, config: ModelConfig, split: LMDBSplit, device, precision: str, flip=False
) -> tuple[str, dict]:
    """``(key, the parts it hashes)`` of a gallery encoded by ``model``'s vision tower (``flip``: mirrored)."""
    parts = {
        "version": CACHE_VERSION,
        "visual_sha256": state_dict_digest(model.visual.state_dict()),
        "vision_info": {k: v for k, v in config.model_info.items() if not k.startswith("text_") and k != "vocab_size"},
        "images_sha256": split.images_digest(),
        "precision": effective_precision(device, precision),
        "device_type": torch.device(device).type,
        **({"flip": True} if flip else {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40], parts


def _read_entry(fpath: Path, ipath: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        ids, feats = np.load(ipath, allow_pickle=False), np.load(fpath, allow_pickle=False)
    except (ValueError, OSError):
        return None
    if ids.ndim == 1 and feats.ndim == 2 and len(ids) == len(feats):
        return ids.astype(np.int64), feats.astype(np.float32)
    return None


def cached_image_features(
    model,
    split: LMDBSplit,
    config: ModelConfig,
    *,
    cache_dir: str | os.PathLike | None,
    device,
    precision: str,
    flip: bool = False,
    **encode_kw,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`~.encode.encode_images` through the cache: ``(ids, feats, info)``, ``info["cache"]`` hit|miss|off."""
    encode_kw.update(device=device, precision=precision, flip=flip)
    if cache_dir is None:
        return *encode_images(model, split, config, **encode_kw), {"cache": "off"}
    t0 = time.perf_counter()
    key, parts = image_cache_key(model, config, split, device, precision, flip)
    log.info("image cache key %s (%.1f s to hash weights and images)", key[:12], time.perf_counter() - t0)
    stem = str(Path(cache_dir) / f"img_{key}") + ".npy"
    fpath, ipath, _ = feature_paths(stem)
    info = {"cache": "miss", "cache_key": key, "images_sha256": parts["images_sha256"], "cache_file": str(fpath)}
    if fpath.is_file() and ipath.is_file():
        entry = _read_entry(fpath, ipath)
        if entry is not None:
            log.info("image features from the cache (%d images): %s", len(entry[0]), fpath)
            return *entry, {**info, "cache": "hit"}
        log.warning("unreadable cache entry %s; encoding again", fpath)
    ids, feats = encode_images(model, split, config, **encode_kw)
    meta = {"cache_key_parts": parts, "split_dir": str(split.split_dir)}
    save_features(stem, "image", ids, feats, fmt="npy", meta=meta)
    return ids, feats, info
