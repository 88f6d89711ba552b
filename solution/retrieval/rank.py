"""Top-k retrieval from features (chunked fp32 products; ties to the first gallery row, as cn_clip's
``make_topk_predictions.py``), and :func:`predict`: a submission ``NAME.jsonl`` (a line per query, ids best
first) with its manifest ``NAME.json`` (:mod:`.manifest`) beside it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from solution.common import SolutionError, check_output, write_json, write_jsonl
from solution.formats.feature_files import load_features, resolve_features
from solution.formats.hits import array_digest

from .manifest import build_manifest, manifest_path, output_lock, read_json_head
from .metrics import topk

log = logging.getLogger(__name__)

DIRECTIONS = {"t2i": ("text", "image"), "i2t": ("image", "text")}
DEFAULT_MEMORY_MB = 512


def auto_chunk(gallery_size: int, memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """Queries per matrix product so one score block stays within ``memory_mb``."""
    return int(max(1, min(8192, memory_mb * 2**20 // (4 * max(1, gallery_size)))))


def rank(query_feats, gallery_feats, gallery_ids, k: int, *, device="cpu", chunk_size=None, progress=False):
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
    return [
        {f"{qkind}_id": q, f"{gkind}_ids": r}
        for q, r in zip(np.asarray(query_ids).tolist(), np.asarray(ranked).tolist())
    ]


def _is_submission(path: Path) -> bool:
    head = read_json_head(path, whole=False)
    return any({f"{q}_id", f"{g}_ids"} <= set(head) for q, g in DIRECTIONS.values())


def submission_paths(output, inputs) -> tuple[Path, Path]:
    """``(output, its manifest)``, refused when either is an input or an existing file of another kind."""
    output = check_output(output, inputs=inputs, what="--output", own=_is_submission)
    own = lambda p: {"submission", "ranking"} <= set(read_json_head(p))  # noqa: E731  (every manifest has both)
    return output, check_output(manifest_path(output), inputs=inputs, what="manifest (beside --output)", own=own)


def write_submission(output: Path, mpath: Path, rows: list[dict], manifest: dict) -> dict:
    """Write a submission and its manifest under a lock on the output (:func:`~.manifest.output_lock`);
    ``{output, manifest, count, seconds, ranking}``."""
    with output_lock([output, mpath]):
        n = write_jsonl(output, rows)
        write_json(mpath, {**manifest, "num_queries": n})
    log.info(f"{n} predictions ({manifest['ranking']['method']}) in {manifest['seconds']:.1f} s -> {output}")
    return {
        "output": str(output),
        "manifest": str(mpath),
        "count": n,
        **{k: manifest[k] for k in ("seconds", "ranking")},
    }


def _load_pair(a):
    texts, images = load_features(a.text_feats, "text"), load_features(a.image_feats, "image")
    if texts.feats.shape[1] != images.feats.shape[1]:
        raise SolutionError(
            f"text features are {texts.feats.shape[1]}-d but image features {images.feats.shape[1]}-d: "
            "not from the same model"
        )
    shas = {fs.meta.get("checkpoint_sha256") for fs in (texts, images)}
    if None not in shas and len(shas) > 1 and not a.allow_mixed_features:
        raise SolutionError(
            f"text features come from {texts.meta.get('checkpoint')}, image features from "
            f"{images.meta.get('checkpoint')}: pass --allow-mixed-features if that is meant"
        )
    for fs in (texts, images):
        if fs.meta.get("sha256") not in (None, array_digest(fs.ids, fs.feats)):
            raise SolutionError(f"{fs.path}: the features changed since extraction (digest in its meta): extract again")
        norms = np.linalg.norm(fs.feats, axis=1)
        if np.abs(norms - 1).max() > 1e-3:
            log.warning(f"{fs.path}: features are not L2-normalised (norms {norms.min():.3g}..{norms.max():.3g})")
    return texts, images


def predict(a, command) -> dict:
    """Write the submission and manifest ``a`` (flags as parsed by :mod:`solution.predict`) asks for;
    ``{output, manifest, count, seconds, ranking}``."""
    pairs = ((a.text_feats, "text"), (a.image_feats, "image"))
    inputs = [p for path, kind in pairs for p in resolve_features(path, kind)[1:] if p is not None]
    output, mpath = submission_paths(a.output, inputs)
    t0 = time.perf_counter()
    texts, images = _load_pair(a)
    query, gallery = (texts, images) if a.direction == "t2i" else (images, texts)
    chunk = a.chunk_size or auto_chunk(len(gallery.ids))
    kw = dict(device=a.device, chunk_size=chunk, progress=not a.no_progress)
    ranked, _ = rank(query.feats, gallery.feats, gallery.ids, a.top_k, **kw)
    fields = dict(
        top_k=a.top_k, checkpoints=a.checkpoint, command=command, ranking={"method": "fp32", "chunk_size": chunk}
    )
    seconds = time.perf_counter() - t0
    manifest = build_manifest(
        texts, images, output, direction=a.direction, valid_score=a.valid_score, seconds=seconds, **fields
    )
    return write_submission(output, mpath, prediction_rows(a.direction, query.ids, ranked), manifest)
