"""Feature extraction (``python -m solution.features``): every input read and every output checked before the
model loads. The image-feature cache every gallery is encoded through: an entry ``img_KEY.npy`` (+ ids, meta with
the digest) keyed by the vision weights, the LMDB's digest, the vision config, precision, device type and flip."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from cn_clip_patch.prompt import PromptError, check_prompt
from solution.common import SolutionError
from solution.data.lmdb_io import LMDBSplit
from solution.formats.feature_files import KINDS, check_outputs, feature_paths, save_features
from solution.formats.hits import array_digest
from solution.formats.muge import read_texts
from solution.model import ModelConfig, load_model, state_dict_digest
from solution.model.compiled import CompileClock, check_compile, compile_towers
from solution.model.precision import effective_precision, model_math

from .encode import encode_images, encode_texts
from .rank import feature_provenance, output_lock, read_json_head

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


def _is_features(path: Path) -> bool:
    """An existing file of an earlier extraction: its meta says so, or cn_clip's JSON lines of features."""
    meta = re.sub(r"(\.ids)?\.npy$|\.jsonl$|\.meta\.json$", "", str(path)) + ".meta.json"
    return read_json_head(meta).get("kind") in KINDS or "feature" in read_json_head(path, whole=False)


def extract(a) -> dict:
    """Extract what ``a`` (flags as parsed by :mod:`solution.features`) asks; ``{"text": {path, count, seconds,
    ...}, "image": {...}}`` of what was written."""
    if not (a.extract_text_feats or a.extract_image_feats):
        raise SolutionError("nothing to do: pass --extract-image-feats and/or --extract-text-feats")
    if min(a.img_batch_size, a.text_batch_size) < 1:
        raise SolutionError("--img-batch-size and --text-batch-size must be at least 1")
    if a.torchcompile:
        check_compile(a.device, a.torchcompile_backend)
    records = read_texts(a.text_data) if a.extract_text_feats else None
    split = LMDBSplit(a.image_data, need_pairs=False) if a.extract_image_feats else None
    lmdb = [split.split_dir / "imgs" / f for f in ("data.mdb", "lock.mdb")] if split else []
    outputs = {"--text-feat-output-path": a.text_feat_output_path} if records else {}
    outputs.update({"--image-feat-output-path": a.image_feat_output_path} if split else {})
    check_outputs(outputs, a.format, [a.resume, a.text_data, *lmdb], own=_is_features)
    precision = effective_precision(a.device, a.precision)
    paths = [p for out in outputs.values() for p in feature_paths(out, a.format) if p is not None]
    with model_math(a.device):
        model, config, ckpt = _load(a, precision)
        provenance = feature_provenance(a.resume, ckpt, config, precision=precision, device=a.device)
        kw = dict(device=a.device, precision=precision, progress=not a.no_progress)
        result = {}
        with output_lock(paths):
            if records:
                clock, t0, c0 = CompileClock(), time.perf_counter(), time.process_time()
                ids = np.asarray([r.text_id for r in records], np.int64)
                feats = encode_texts(model, [r.text for r in records], config, batch_size=a.text_batch_size, **kw)
                meta = {**provenance, "data": str(Path(a.text_data).resolve()), "sha256": array_digest(ids, feats)}
                path = save_features(a.text_feat_output_path, "text", ids, feats, fmt=a.format, meta=meta)[0]
                result["text"] = _done("text", path, len(ids), t0, clock, cpu_seconds=time.process_time() - c0)
            if split:
                clock, t0 = CompileClock(), time.perf_counter()
                kw.update(cache_dir=a.cache_dir, batch_size=a.img_batch_size, num_workers=a.num_workers)
                ids, feats, info = cached_image_features(model, split, config, **kw)
                if len(ids) < split.num_images:
                    log.warning(f"{split.num_images - len(ids)} of {split.num_images} images could not be decoded")
                meta = {**provenance, "data": str(split.split_dir.resolve() / "imgs"), **info}
                meta["sha256"] = array_digest(ids, feats)
                path = save_features(a.image_feat_output_path, "image", ids, feats, fmt=a.format, meta=meta)[0]
                result["image"] = _done("image", path, len(ids), t0, clock, cache=info["cache"])
    return result


def _load(a, precision: str):
    t0 = time.perf_counter()
    overrides = dict(vision_model=a.vision_model, text_model=a.text_model, context_length=a.context_length)
    model, config, ckpt = load_model(
        a.resume, device=a.device, text_prompt=a.prompt, attn_impl=a.attn_impl, **overrides
    )
    if set(ckpt) == {"state_dict"} and a.context_length is None:
        raise SolutionError(f"{a.resume} holds bare weights: its context length cannot be known; pass --context-length")
    try:
        check_prompt(config.text_prompt, config.context_length)
    except PromptError as e:
        raise SolutionError(str(e)) from None
    model.eval()
    if a.torchcompile:
        compile_towers(model, a.device, a.torchcompile_backend)
    log.info(
        f"loaded {a.resume} ({config.arch}, context {config.context_length}, prompt {config.text_prompt!r}) "
        f"on {a.device}, {precision}, in {time.perf_counter() - t0:.1f} s"
    )
    return model, config, ckpt


def _done(kind: str, path: Path, n: int, t0: float, clock: CompileClock, **extra) -> dict:
    """A part's result and log line; its rate leaves out the compile seconds spent in it."""
    seconds, spent = time.perf_counter() - t0, clock.lap()
    note = f", torch.compile {spent:.1f} s left out" if spent > 0 else ""
    log.info(f"{n} {kind} features in {seconds:.1f} s ({n / max(seconds - spent, 1e-9):.1f}/s{note}) -> {path}")
    return {"path": str(path), "count": n, "seconds": seconds, "compile_seconds": spent, **extra}
