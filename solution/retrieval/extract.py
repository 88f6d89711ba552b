"""Feature extraction (``python -m solution.features``): a checkpoint's text and/or image features written as
feature files with their provenance and digest.

Every input is read and every output checked before the model loads, so a bad command writes nothing. Images go
through the cache (:mod:`.cache`); the model runs under ``model_math`` (TF32 on CUDA). With ``torchcompile`` the
towers' blocks are compiled; the compile seconds are logged and left out of the rates.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from cn_clip_patch.prompt import PromptError, check_prompt
from solution.common import SolutionError
from solution.data.lmdb_io import LMDBSplit
from solution.formats.feature_files import KINDS, check_outputs, feature_paths, save_features
from solution.formats.hits import array_digest
from solution.formats.muge import read_texts
from solution.model import load_model
from solution.model.compiled import CompileClock, check_compile, compile_towers
from solution.model.precision import effective_precision, model_math

from .cache import cached_image_features
from .encode import encode_texts
from .manifest import feature_provenance, output_lock, read_json_head

log = logging.getLogger(__name__)


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
                ids = [r.text_id for r in records]
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
