"""The image-feature cache: a gallery encoded once per vision tower, image LMDB and precision.

An entry is a feature file ``img_KEY.npy`` (+ ids, meta with the features' digest) in the cache folder; the key
hashes the vision tower's weights, the LMDB's content digest, the vision config, the effective precision and
device type, and ``flip`` for mirrored images. An entry that cannot be read or fails its digest is encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from solution.data.lmdb_io import LMDBSplit
from solution.formats.feature_files import feature_paths, save_features
from solution.formats.hits import array_digest
from solution.model import ModelConfig, state_dict_digest
from solution.model.precision import effective_precision

from .encode import encode_images
from .manifest import read_json_head

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_DIR_ENV = "SOLUTION_CACHE_DIR"


def cache_dir_default(environ: Mapping[str, str]) -> Path:
    """The cache folder a CLI defaults to, given its environment."""
    return Path(environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "cnclip-solution" / "image_feats")


def image_cache_key(model, config: ModelConfig, split: LMDBSplit, device, precision: str, flip=False):
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


def _read_entry(stem: str) -> tuple[np.ndarray, np.ndarray] | None:
    fpath, ipath, mpath = feature_paths(stem)
    try:
        ids, feats = np.load(ipath, allow_pickle=False), np.load(fpath, allow_pickle=False)
    except (ValueError, OSError):
        return None
    if ids.ndim == 1 and feats.ndim == 2 and read_json_head(mpath).get("sha256") == array_digest(ids, feats):
        return ids.astype(np.int64), feats.astype(np.float32)
    log.warning("cache entry %s cannot be read or fails its digest; encoding again", fpath)
    return None


def cached_image_features(
    model, split: LMDBSplit, config: ModelConfig, *, cache_dir, device, precision: str, flip=False, **encode_kw
) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`~.encode.encode_images` through the cache: ``(ids, feats, info)``, ``info["cache"]`` hit|miss|off."""
    encode_kw.update(device=device, precision=precision, flip=flip)
    if cache_dir is None:
        return *encode_images(model, split, config, **encode_kw), {"cache": "off"}
    t0 = time.perf_counter()
    key, parts = image_cache_key(model, config, split, device, precision, flip)
    log.info("image cache key %s (%.1f s to hash weights and images)", key[:12], time.perf_counter() - t0)
    stem = str(Path(cache_dir) / f"img_{key}") + ".npy"
    info = {"cache": "miss", "cache_key": key, "images_sha256": parts["images_sha256"], "cache_file": stem}
    entry = _read_entry(stem) if Path(stem).is_file() else None
    if entry is not None:
        log.info("image features from the cache (%d images): %s", len(entry[0]), stem)
        return *entry, {**info, "cache": "hit"}
    ids, feats = encode_images(model, split, config, **encode_kw)
    meta = {"cache_key_parts": parts, "split_dir": str(split.split_dir), "sha256": array_digest(ids, feats)}
    save_features(stem, "image", ids, feats, fmt="npy", meta=meta)
    return ids, feats, info
