"""Feature extraction: a checkpoint's text and/or image features written as feature files.

The work behind ``python -m solution.features`` (``bash Chinese-CLIP/feature_extract.sh``).
Architecture, prompt and context length come from the checkpoint's stored config (overrides win,
with a warning). Every input is read (texts by :func:`solution.formats.muge.read_texts`) and every
output checked before the model loads (an output that is an input, a folder, under a file, or
both the image and the text output is refused with one line), so a bad command writes nothing.
Image features go through the cache of :mod:`.cache`; each feature file records its provenance
(:func:`.manifest.feature_provenance`). The model math runs under :func:`.precision.model_math` (TF32
on CUDA). With ``torchcompile`` both towers are compiled (:mod:`.compiled`; refused before anything
loads where that cannot work); the compile seconds are logged and left out of the texts/s and
images/s rates (``seconds`` stays the wall time, ``compile_seconds`` beside it).
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
    attn_impl: str = "sdpa"  # text-tower attention (solution.model.ATTN_IMPLS)
    torchcompile: bool = False  # torch.compile both towers (compile time logged, kept out of the rates)
    torchcompile_backend: str = "inductor"  # tests: aot_eager / eager


def _inputs(job: Extraction) -> tuple[list[int] | None, list[str] | None, LMDBSplit | None]:
    """Read every input and check every output: ``(text ids, texts, image split)``."""
    ids = texts = split = None
    if job.text_data is not None:
        records = read_texts(job.text_data)
        ids, texts = [r.text_id for r in records], [r.text for r in records]
    if job.image_data is not None:
        split = LMDBSplit(job.image_data, need_pairs=False)
    inputs = [
        job.resume,
        job.text_data,
        *((split.split_dir / "imgs" / f for f in ("data.mdb", "lock.mdb")) if split else ()),
    ]
    check_outputs(
        {
            **({"--text-feat-output-path": job.text_out} if texts else {}),
            **({"--image-feat-output-path": job.image_out} if split else {}),
        },
        job.fmt,
        inputs,
    )
    return ids, texts, split


def _load(job: Extraction, precision: str):
    t0 = time.perf_counter()
    model, config, ckpt = load_model(
        job.resume,
        device=job.device,
        vision_model=job.vision_model,
        text_model=job.text_model,
        context_length=job.context_length,
        text_prompt=job.prompt,
        attn_impl=job.attn_impl,
    )
    try:
        check_prompt(config.text_prompt, config.context_length)
    except PromptError as e:
        raise SolutionError(str(e)) from None
    model.eval()
    if job.torchcompile:
        compile_towers(model, job.device, job.torchcompile_backend)
    log.info(
        "loaded %s (%s, context %d, prompt %r) on %s, %s, in %.1f s",
        job.resume,
        config.arch,
        config.context_length,
        config.text_prompt,
        job.device,
        precision,
        time.perf_counter() - t0,
    )
    return model, config, ckpt


def _rate(n: int, seconds: float, clock: CompileClock) -> tuple[float, float, str]:
    """``(items/s without compile, compile seconds, a note for the log line)`` of a part that took ``seconds``."""
    spent = clock.lap()
    note = f", torch.compile {spent:.1f} s left out" if spent > 0 else ""
    return n / max(seconds - spent, 1e-9), spent, note


def _texts(job: Extraction, model, config, ids, texts, precision: str, provenance: dict) -> dict:
    clock = CompileClock()
    t0, c0 = time.perf_counter(), time.process_time()
    feats = encode_texts(
        model,
        texts,
        config,
        batch_size=job.text_batch_size,
        device=job.device,
        precision=precision,
        progress=job.progress,
    )
    paths = save_features(
        job.text_out, "text", ids, feats, fmt=job.fmt, meta={**provenance, "data": str(Path(job.text_data).resolve())}
    )
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    rate, spent, note = _rate(len(ids), secs, clock)
    log.info("%d text features in %.1f s (%.1f texts/s%s) -> %s", len(ids), secs, rate, note, paths[0])
    return {"path": str(paths[0]), "count": len(ids), "seconds": secs, "cpu_seconds": cpu, "compile_seconds": spent}


def _images(job: Extraction, model, config, split: LMDBSplit, precision: str, provenance: dict) -> dict:
    clock = CompileClock()
    t0 = time.perf_counter()
    ids, feats, info = cached_image_features(
        model,
        split,
        config,
        cache_dir=job.cache_dir,
        device=job.device,
        precision=precision,
        batch_size=job.img_batch_size,
        num_workers=job.num_workers,
        progress=job.progress,
    )
    if len(ids) < split.num_images:
        log.warning(
            "%d of %d images could not be decoded and have no feature", split.num_images - len(ids), split.num_images
        )
    paths = save_features(
        job.image_out,
        "image",
        ids,
        feats,
        fmt=job.fmt,
        meta={**provenance, "data": str(split.split_dir.resolve() / "imgs"), **info},
    )
    secs = time.perf_counter() - t0
    rate, spent, note = _rate(len(ids), secs, clock)
    log.info(
        "%d image features in %.1f s (%.1f images/s, %s%s) -> %s", len(ids), secs, rate, info["cache"], note, paths[0]
    )
    return {"path": str(paths[0]), "count": len(ids), "seconds": secs, "cache": info["cache"], "compile_seconds": spent}


def extract(job: Extraction) -> dict:
    """Extract what ``job`` asks; ``{"text": {path, count, seconds, ...}, "image": {...}}`` of what was written."""
    if job.text_data is None and job.image_data is None:
        raise SolutionError("nothing to do: pass --extract-image-feats and/or --extract-text-feats")
    for name in ("img_batch_size", "text_batch_size"):
        if getattr(job, name) < 1:
            raise SolutionError(f"--{name.replace('_', '-')} must be at least 1")
    precision = effective_precision(job.device, job.precision)
    if job.torchcompile:
        check_compile(job.device, job.torchcompile_backend)
    ids, texts, split = _inputs(job)  # before the model loads: a bad input or output writes nothing
    with model_math(job.device):
        return _extract(job, precision, ids, texts, split)


def _extract(job: Extraction, precision: str, ids, texts, split) -> dict:
    model, config, ckpt = _load(job, precision)
    provenance = feature_provenance(job.resume, ckpt, config, precision=precision, device=job.device)
    result: dict = {}
    if texts is not None:
        result["text"] = _texts(job, model, config, ids, texts, precision, provenance)
    if split is not None:
        result["image"] = _images(job, model, config, split, precision, provenance)
    return result
