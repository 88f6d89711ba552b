"""Feature extraction (the work behind ``python -m solution.features``): a checkpoint's text and/or image
features written as feature files with their provenance.

Every input is read and every output checked before the model loads, so a bad command writes nothing.
Images go through the cache (:mod:`.cache`); the model math runs under ``model_math`` (TF32 on CUDA). With
``torchcompile`` the towers' blocks are compiled; the compile seconds are logged and left out of the rates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cn_clip_patch.prompt import PromptError, check_prompt
from solution.common import SolutionError
from solution.data.lmdb_io import LMDBSplit
from solution.formats.feature_files import check_outputs, save_features
from solution.formats.muge import read_texts
from solution.model import load_model
from solution.model.compiled import CompileClock, check_compile, compile_towers
from solution.model.precision import effective_precision, model_math

from .cache import cached_image_features
from .encode import encode_texts
from .manifest import feature_provenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extraction:
    """What to extract: the checkpoint (+ overrides), inputs and outputs (None: not extracted), and how."""

    resume: str
    text_data: str | None = None  # texts JSONL -> text_out
    text_out: str | None = None
    image_data: str | None = None  # image LMDB -> image_out
    image_out: str | None = None
    fmt: str = "npy"
    vision_model: str | None = None
    text_model: str | None = None
    context_length: int | None = None
    prompt: str | None = None
    device: str | torch.device = "cpu"
    precision: str = "amp"
    text_batch_size: int = 64
    img_batch_size: int = 64
    num_workers: int = 0
    cache_dir: str | None = None  # None: no image cache
    progress: bool = False
    attn_impl: str = "sdpa"
    torchcompile: bool = False
    torchcompile_backend: str = "inductor"  # tests: aot_eager / eager


def extract(job: Extraction) -> dict:
    """Extract what ``job`` asks; ``{"text": {path, count, seconds, ...}, "image": {...}}`` of what was written."""
    if job.text_data is None and job.image_data is None:
        raise SolutionError("nothing to do: pass --extract-image-feats and/or --extract-text-feats")
    for name in ("img_batch_size", "text_batch_size"):
        if getattr(job, name) < 1:
            raise SolutionError(f"--{name.replace('_', '-')} must be at least 1")
    if job.torchcompile:
        check_compile(job.device, job.torchcompile_backend)
    records = read_texts(job.text_data) if job.text_data is not None else None
    split = LMDBSplit(job.image_data, need_pairs=False) if job.image_data is not None else None
    lmdb = [split.split_dir / "imgs" / f for f in ("data.mdb", "lock.mdb")] if split else []
    outputs = {"--text-feat-output-path": job.text_out} if records else {}
    outputs.update({"--image-feat-output-path": job.image_out} if split else {})
    check_outputs(outputs, job.fmt, [job.resume, job.text_data, *lmdb])
    precision = effective_precision(job.device, job.precision)
    with model_math(job.device):
        model, config, ckpt = _load(job, precision)
        provenance = feature_provenance(job.resume, ckpt, config, precision=precision, device=job.device)
        kw = dict(device=job.device, precision=precision, progress=job.progress)
        result = {}
        if records:
            clock, t0, c0 = CompileClock(), time.perf_counter(), time.process_time()
            ids = [r.text_id for r in records]
            feats = encode_texts(model, [r.text for r in records], config, batch_size=job.text_batch_size, **kw)
            meta = {**provenance, "data": str(Path(job.text_data).resolve())}
            path = save_features(job.text_out, "text", ids, feats, fmt=job.fmt, meta=meta)[0]
            result["text"] = _done("text", path, len(ids), t0, clock, cpu_seconds=time.process_time() - c0)
        if split:
            clock, t0 = CompileClock(), time.perf_counter()
            ids, feats, info = cached_image_features(
                model,
                split,
                config,
                cache_dir=job.cache_dir,
                batch_size=job.img_batch_size,
                num_workers=job.num_workers,
                **kw,
            )
            if len(ids) < split.num_images:
                log.warning(f"{split.num_images - len(ids)} of {split.num_images} images could not be decoded")
            meta = {**provenance, "data": str(split.split_dir.resolve() / "imgs"), **info}
            path = save_features(job.image_out, "image", ids, feats, fmt=job.fmt, meta=meta)[0]
            result["image"] = _done("image", path, len(ids), t0, clock, cache=info["cache"])
    return result


def _load(job: Extraction, precision: str):
    t0 = time.perf_counter()
    overrides = dict(vision_model=job.vision_model, text_model=job.text_model, context_length=job.context_length)
    model, config, ckpt = load_model(
        job.resume, device=job.device, text_prompt=job.prompt, attn_impl=job.attn_impl, **overrides
    )
    try:
        check_prompt(config.text_prompt, config.context_length)
    except PromptError as e:
        raise SolutionError(str(e)) from None
    model.eval()
    if job.torchcompile:
        compile_towers(model, job.device, job.torchcompile_backend)
    log.info(
        f"loaded {job.resume} ({config.arch}, context {config.context_length}, prompt {config.text_prompt!r}) "
        f"on {job.device}, {precision}, in {time.perf_counter() - t0:.1f} s"
    )
    return model, config, ckpt


def _done(kind: str, path: Path, n: int, t0: float, clock: CompileClock, **extra) -> dict:
    """A part's result and log line; its rate leaves out the compile seconds spent in it."""
    seconds, spent = time.perf_counter() - t0, clock.lap()
    note = f", torch.compile {spent:.1f} s left out" if spent > 0 else ""
    log.info(f"{n} {kind} features in {seconds:.1f} s ({n / max(seconds - spent, 1e-9):.1f}/s{note}) -> {path}")
    return {"path": str(path), "count": n, "seconds": seconds, "compile_seconds": spent, **extra}
