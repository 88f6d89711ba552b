"""Top-k retrieval from features (chunked fp32 products; ties to the first gallery row, as cn_clip's
``make_topk_predictions.py``) and :func:`predict`: a submission ``NAME.jsonl`` (a line per query, ids best first)
with its manifest ``NAME.json`` beside it; what feature files record of their model; the lock on an output."""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from solution.common import SolutionError, check_output, folder_lock, write_json, write_jsonl
from solution.formats.feature_files import load_features, resolve_features
from solution.formats.hits import array_digest
from solution.formats.run_files import METRICS, main_valid, read_metrics
from solution.model import ModelConfig
from solution.model.precision import exact_math

from .metrics import RECALL_KEYS

log = logging.getLogger(__name__)

DIRECTIONS = {"t2i": ("text", "image"), "i2t": ("image", "text")}
DEFAULT_MEMORY_MB = 512


def topk_rows(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first top-``k`` of each row of ``s``, ties to the lower column (a stable descending sort's order):
    ``torch.topk`` of ``k + 1`` reordered, and a full sort for the rows whose tie straddles the k-th place."""
    n = s.shape[1]
    k = min(k, n)
    kk = min(k + 1, n)
    vals, idx = torch.topk(s, kk, dim=1)
    order = torch.argsort(idx, dim=1)
    vals, idx = torch.gather(vals, 1, order), torch.gather(idx, 1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    vals, idx = torch.gather(vals, 1, order), torch.gather(idx, 1, order)
    if kk > k:
        for r in (vals[:, k - 1] == vals[:, k]).nonzero().flatten().tolist():
            full = torch.sort(s[r], descending=True, stable=True)
            vals[r], idx[r] = full.values[:kk], full.indices[:kk]
    return vals[:, :k], idx[:, :k]


@exact_math()  # float32 ``highest`` whatever the caller set
def topk(queries, gallery, k: int, *, chunk_size: int = 4096, device="cpu", progress: bool = False):
    """``(scores [Q, k], indices [Q, k])`` of the best gallery rows of every query by inner product, ties to the
    lower row (as upstream's ``sorted``), ``chunk_size`` queries at a time."""
    q, g = torch.as_tensor(queries).float(), torch.as_tensor(gallery).float().to(device)
    k = min(k, g.shape[0])
    all_s, all_i = [torch.zeros((0, k))], [torch.zeros((0, k), dtype=torch.int64)]
    for start in tqdm(range(0, q.shape[0], chunk_size), desc="top-k", unit="chunk", disable=not progress):
        vals, idx = topk_rows(q[start : start + chunk_size].to(device) @ g.T, k)
        all_s.append(vals.cpu())
        all_i.append(idx.cpu())
    return torch.cat(all_s).numpy(), torch.cat(all_i).numpy()


def auto_chunk(gallery_size: int, memory_mb: float = DEFAULT_MEMORY_MB) -> int:
    """Queries per matrix product so one score block stays within ``memory_mb``."""
    return int(max(1, min(8192, memory_mb * 2**20 // (4 * max(1, gallery_size)))))


def prediction_rows(direction: str, query_ids, ranked) -> list[dict]:
    q, g = DIRECTIONS[direction]
    return [{f"{q}_id": i, f"{g}_ids": r} for i, r in zip(np.asarray(query_ids).tolist(), np.asarray(ranked).tolist())]


def _is_submission(path: Path) -> bool:
    head = read_json_head(path, whole=False)
    return any({f"{q}_id", f"{g}_ids"} <= set(head) for q, g in DIRECTIONS.values())


def submission_paths(output, inputs) -> tuple[Path, Path]:
    """``(output, its manifest)``, refused when either is an input or an existing file of another kind."""
    output = check_output(output, inputs=inputs, what="--output", own=_is_submission)
    own = lambda p: {"submission", "ranking"} <= set(read_json_head(p))  # noqa: E731  (every manifest has both)
    return output, check_output(manifest_path(output), inputs=inputs, what="manifest (beside --output)", own=own)


def write_submission(output: Path, mpath: Path, rows: list[dict], manifest: dict) -> dict:
    """Write a submission and its manifest under a lock on the output (:func:`output_lock`);
    ``{output, manifest, count, seconds, ranking}``."""
    with output_lock([output, mpath]):
        n = write_jsonl(output, rows)
        write_json(mpath, {**manifest, "num_queries": n})
    log.info(f"{n} predictions ({manifest['ranking']['method']}) in {manifest['seconds']:.1f} s -> {output}")
    written = {"output": str(output), "manifest": str(mpath), "count": n}
    return {**written, **{k: manifest[k] for k in ("seconds", "ranking")}}


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
    if a.top_k > len(gallery.ids):
        raise SolutionError(f"top-{a.top_k} asked but the gallery has only {len(gallery.ids)} items")
    _, idx = topk(query.feats, gallery.feats, a.top_k, chunk_size=chunk, device=a.device, progress=not a.no_progress)
    ranking, seconds = {"method": "fp32", "chunk_size": chunk}, round(time.perf_counter() - t0, 3)
    fields = dict(top_k=a.top_k, named=a.checkpoint, ranking=ranking, seconds=seconds, command=list(command))
    manifest = build_manifest(texts, images, output, direction=a.direction, valid_score=a.valid_score, **fields)
    return write_submission(output, mpath, prediction_rows(a.direction, query.ids, gallery.ids[idx]), manifest)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as e:
        raise SolutionError(f"cannot read {path}: {e.strerror}") from None
    return h.hexdigest()


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def read_json_head(path: str | os.PathLike, whole: bool = True) -> dict:
    """An existing file's JSON object (``whole``; else its first line's), or {} when it holds none: what tells an
    earlier output of ours from a file of another kind (a checkpoint, an LMDB, a user's file)."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read(1 << 24) if whole else f.readline(1 << 24))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


@contextlib.contextmanager
def output_lock(paths: Sequence[Path]):
    """A lock on the first of ``paths`` (``.NAME.lock`` beside it) for the block, after removing the temporary
    files a killed writer of any of them left (no live writer can own them under the lock)."""
    paths = [Path(p) for p in paths]
    with folder_lock(paths[0].parent / f".{paths[0].name}.lock", str(paths[0])):
        for p in paths:
            for tmp in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
                tmp.unlink(missing_ok=True)
        yield


def checkpoint_validation(path: str | os.PathLike, ckpt: dict) -> dict | None:
    """A checkpoint's validation score: stored in it (``mean_recall`` under a usual key; not ``best``), else the
    run's last main-set ``valid`` record at its step in ``metrics.jsonl`` beside ``checkpoints/``; or None."""
    for name in ("metrics", "valid", "validation", "val_metrics"):
        v = ckpt.get(name)
        if isinstance(v, dict) and "mean_recall" in v:
            return {**{k: v[k] for k in RECALL_KEYS if k in v}, "source": f"checkpoint[{name!r}]"}
    ckpt_dir = Path(path).resolve().parent
    if ckpt_dir.name != "checkpoints" or "step" not in ckpt:
        return None
    metrics = ckpt_dir.parent / METRICS
    found = [r for r in main_valid(read_metrics(metrics)) if r.get("step") == ckpt["step"]]
    if not found:
        return None
    row = {**found[-1], "source": str(metrics)}
    return {k: row.get(k) for k in (*RECALL_KEYS, "step", "epoch", "source")}


def feature_provenance(checkpoint, ckpt: dict, config: ModelConfig, *, precision: str, device) -> dict:
    """What every feature file of one extraction records about its model."""
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": file_sha256(checkpoint),
        "config": config.to_dict(),
        "prompt": config.text_prompt,
        "context_length": config.context_length,
        "precision": precision,
        "device": str(device),
        "validation": checkpoint_validation(checkpoint, ckpt),
        "created": now(),
    }


def manifest_path(output: str | Path) -> Path:
    """The manifest beside a submission: ``NAME.json`` for ``NAME.jsonl``."""
    output = Path(output)
    if output.suffix == ".json":
        raise SolutionError(f"--output {output} ends in .json, the manifest's name; use .jsonl")
    return output.with_suffix(".json")


def parse_score(text: str) -> dict:
    """``--valid-score``: a mean recall, or a JSON object of r1/r5/r10/mean_recall."""
    with contextlib.suppress(json.JSONDecodeError):
        value = json.loads(text)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"mean_recall": float(value), "source": "--valid-score"}
        if isinstance(value, dict):
            return {**value, "source": "--valid-score"}
    raise SolutionError(f"--valid-score {text!r}: give a number (mean recall) or a JSON object")


def build_manifest(texts, images, output: Path, *, direction: str, valid_score, named=(), **recorded) -> dict:
    """A submission's manifest: what it ranked (feature sets), with what (the features' checkpoints, each once, then
    those ``named``), how well that scored on validation, and the ``recorded`` fields."""
    config = texts.meta.get("config") or images.meta.get("config")
    queries, gallery = (texts, images) if direction == "t2i" else (images, texts)
    used: dict[tuple, list[str]] = {}
    features, kept = {}, ("checkpoint", "checkpoint_sha256", "precision", "data", "cache", "created")
    for fs in (texts, images):
        if fs.meta.get("checkpoint"):
            used.setdefault((fs.meta["checkpoint"], fs.meta.get("checkpoint_sha256")), []).append(fs.kind)
        entry = {"path": str(fs.path.resolve()), "format": fs.format, "count": len(fs.ids), "dim": fs.feats.shape[1]}
        features[fs.kind] = {**entry, **{k: fs.meta[k] for k in kept if k in fs.meta}}
    return {
        "submission": str(output.resolve()),
        "direction": direction,
        "num_queries": len(queries.ids),
        "gallery_size": len(gallery.ids),
        "checkpoints": [{"path": c, "sha256": sha, "used_for": kinds} for (c, sha), kinds in used.items()]
        + [{"path": str(Path(c).resolve()), "sha256": None, "used_for": ["--checkpoint"]} for c in named],
        "config": config,
        "prompt": texts.meta.get("prompt", config.get("text_prompt") if config else None),
        "features": features,
        "validation": valid_score or texts.meta.get("validation") or images.meta.get("validation"),
        "created": now(),
        **recorded,
    }
