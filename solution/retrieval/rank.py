"""Top-k retrieval from features (chunked fp32 products; ties to the first gallery row, as cn_clip's
``make_topk_predictions.py``), and :func:`predict`: a submission ``NAME.jsonl`` (a line per query, ids best
first) with its manifest ``NAME.json`` (:mod:`.manifest`) beside it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from solution.common import SolutionError, check_output, write_json, write_jsonl
from solution.formats.feature_files import FeatureSet, load_features, resolve_features

from .manifest import build_manifest, manifest_path
from .metrics import topk

log = logging.getLogger(__name__)

DIRECTIONS = {"t2i": ("text", "image"), "i2t": ("image", "text")}
DEFAULT_MEMORY_MB = 512


def auto_chunk(gallery_size: int, memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """Queries per matrix product so one score block stays within ``memory_mb``."""
    return int(max(1, min(8192, memory_mb * 2**20 // (4 * max(1, gallery_size)))))


def rank(
    query_feats, gallery_feats, gallery_ids, k: int, *, device="cpu", chunk_size: int | None = None, progress=False
) -> tuple[np.ndarray, np.ndarray]:
    """``(ranked gallery ids [Q, k], scores [Q, k])`` by inner product, best first, ties to the lower row."""
    gallery_ids = np.asarray(gallery_ids)
    if k > len(gallery_ids):
        raise SolutionError(f"top-{k} asked but the gallery has only {len(gallery_ids)} items")
    chunk = chunk_size or auto_chunk(len(gallery_ids))
    q, g = (np.ascontiguousarray(x, dtype=np.float32) for x in (query_feats, gallery_feats))
    scores, idx = topk(q, g, k, chunk_size=chunk, device=device, progress=progress)
    return gallery_ids[idx].astype(np.int64), scores


def prediction_rows(direction: str, query_ids, ranked) -> list[dict]:
    qkind, gkind = DIRECTIONS[direction]
    qkey, gkey = f"{qkind}_id", f"{gkind}_ids"
    return [{qkey: q, gkey: r} for q, r in zip(np.asarray(query_ids).tolist(), np.asarray(ranked).tolist())]


@dataclass(frozen=True)
class Prediction:
    """A submission to write: feature files in, ``output`` (+ its manifest) out, and how to rank."""

    image_feats: str
    text_feats: str
    output: str
    top_k: int = 10
    direction: str = "t2i"
    device: str | torch.device = "cpu"
    chunk_size: int | None = None
    valid_score: dict | None = None  # for the manifest (else the features' provenance)
    checkpoints: tuple = ()  # named in the manifest when the features carry no provenance
    command: tuple = ()
    progress: bool = False


def _load_pair(job: Prediction) -> tuple[FeatureSet, FeatureSet]:
    texts, images = load_features(job.text_feats, "text"), load_features(job.image_feats, "image")
    if texts.feats.shape[1] != images.feats.shape[1]:
        raise SolutionError(
            f"text features are {texts.feats.shape[1]}-d but image features {images.feats.shape[1]}-d: "
            "not from the same model"
        )
    for fs in (texts, images):
        norms = np.linalg.norm(fs.feats, axis=1)
        if np.abs(norms - 1).max() > 1e-3:
            log.warning(f"{fs.path}: features are not L2-normalised (norms {norms.min():.3g}..{norms.max():.3g})")
    return texts, images


def predict(job: Prediction) -> dict:
    """Write ``job``'s submission and manifest; ``{output, manifest, count, seconds, ranking}``."""
    if job.top_k < 1 or (job.chunk_size is not None and job.chunk_size < 1):
        raise SolutionError("--top-k and --chunk-size must be at least 1")
    output = Path(job.output)
    mpath = manifest_path(output)
    pairs = ((job.text_feats, "text"), (job.image_feats, "image"))
    inputs = [p for path, kind in pairs for p in resolve_features(path, kind)[1:] if p is not None]
    check_output(output, inputs=inputs, what="--output")
    check_output(mpath, inputs=inputs, what="manifest (beside --output)")
    t0 = time.perf_counter()
    texts, images = _load_pair(job)
    query, gallery = (texts, images) if job.direction == "t2i" else (images, texts)
    chunk = job.chunk_size or auto_chunk(len(gallery.ids))
    ranked, _ = rank(
        query.feats, gallery.feats, gallery.ids, job.top_k, device=job.device, chunk_size=chunk, progress=job.progress
    )
    n = write_jsonl(output, prediction_rows(job.direction, query.ids, ranked))
    seconds = time.perf_counter() - t0
    ranking = {"method": "fp32", "chunk_size": chunk}
    fields = dict(direction=job.direction, top_k=job.top_k, valid_score=job.valid_score, command=job.command)
    manifest = build_manifest(texts, images, output, checkpoints=job.checkpoints, seconds=seconds, **fields)
    write_json(mpath, {**manifest, "ranking": ranking})
    log.info(f"{n} {query.kind} queries against {len(gallery.ids)} {gallery.kind}s in {seconds:.1f} s -> {output}")
    return {"output": str(output), "manifest": str(mpath), "count": n, "seconds": seconds, "ranking": ranking}
