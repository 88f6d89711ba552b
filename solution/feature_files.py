"""Feature files: the contract between feature extraction and predictions.

For ``PATH`` = ``BASE.npy`` (``--format npy``, the default)::

    BASE.npy          float32 [N, D], L2-normalised rows
    BASE.ids.npy      int64 [N], the image_id / text_id of each row
    BASE.meta.json    provenance: kind, checkpoint (+ sha256), config, prompt, precision, data, validation

and for ``PATH`` = ``BASE.jsonl`` (``--format jsonl``): cn_clip's lines
``{"image_id"|"text_id": int, "feature": [D floats]}`` plus the same ``BASE.meta.json``.
:func:`load_features` reads both (and cn_clip's own JSONL files), refusing duplicate ids and
non-finite values with one clear error.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .common import SolutionError, atomic_path, write_json

log = logging.getLogger(__name__)

FORMATS = ("npy", "jsonl")
KINDS = ("image", "text")


def _base(path: str | os.PathLike) -> str:
    p = str(path)
    for ext in (".npy", ".jsonl"):
        if p.endswith(ext):
            return p[: -len(ext)]
    return p


def feature_format(path: str | os.PathLike) -> str:
    """``npy`` for ``*.npy`` paths, else ``jsonl`` (cn_clip's feature lines)."""
    return "npy" if str(path).endswith(".npy") else "jsonl"


def feature_paths(path: str | os.PathLike, fmt: str | None = None) -> tuple[Path, Path | None, Path]:
    """``(features, ids or None, meta)`` of a feature output.

    npy: ``BASE.npy``, ``BASE.ids.npy``, ``BASE.meta.json`` (``.npy`` is appended when missing);
    jsonl: the path itself, no ids file, ``BASE.meta.json``.
    """
    fmt = fmt or feature_format(path)
    base = _base(path)
    if fmt == "npy":
        return Path(base + ".npy"), Path(base + ".ids.npy"), Path(base + ".meta.json")
    if fmt == "jsonl":
        if str(path).endswith(".npy"):
            raise SolutionError(f"{path}: a .npy path cannot hold jsonl features; name it .jsonl")
        return Path(path), None, Path(base + ".meta.json")
    raise SolutionError(f"unknown feature format {fmt!r}; choose from {', '.join(FORMATS)}")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def save_features(path: str | os.PathLike, kind: str, ids, feats, *, fmt: str | None = None,
                  meta: dict | None = None) -> list[Path]:
    """Write features (each file atomically); returns the paths written (features first)."""
    ids = np.asarray(ids, dtype=np.int64)
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if feats.ndim != 2 or len(ids) != len(feats):
        raise ValueError(f"{len(ids)} ids for features of shape {feats.shape}")
    fpath, ipath, mpath = feature_paths(path, fmt)
    key = f"{kind}_id"
    if ipath is not None:
        _save_npy(ipath, ids)
        _save_npy(fpath, feats)
    else:
        with atomic_path(fpath) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for i, row in zip(ids.tolist(), feats.tolist()):
                f.write(json.dumps({key: i, "feature": row}) + "\n")
    meta = {"kind": kind, "format": "npy" if ipath is not None else "jsonl", "count": int(len(ids)),
            "dim": int(feats.shape[1]), "features": str(fpath.resolve()), **(meta or {})}
    write_json(mpath, meta)
    return [p for p in (fpath, ipath, mpath) if p is not None]


@dataclass
class FeatureSet:
    """Features read back from a file: ``ids`` int64 [N], ``feats`` float32 [N, D], its meta (or {})."""

    path: Path
    kind: str
    format: str
    ids: np.ndarray
    feats: np.ndarray
    meta: dict = field(default_factory=dict)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_features(path: str | os.PathLike, kind: str) -> FeatureSet:
    """Read our ``.npy`` features (+ ``.ids.npy``) or cn_clip's JSONL lines; checks shapes and ids."""
    if kind not in KINDS:
        raise ValueError(kind)
    fmt = feature_format(path)
    fpath, ipath, mpath = feature_paths(path, fmt)
    key = f"{kind}_id"
    if not fpath.is_file():
        raise SolutionError(f"{kind} features not found: {fpath}")
    if fmt == "npy":
        if not ipath.is_file():
            raise SolutionError(f"{fpath}: its ids file {ipath} is missing")
        try:
            feats, ids = np.load(fpath, allow_pickle=False), np.load(ipath, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise SolutionError(f"{fpath}: not a readable .npy feature file ({e})") from None
        if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
            raise SolutionError(f"{fpath}: expected a 2-D float array, got {feats.dtype} {feats.shape}")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise SolutionError(f"{ipath}: expected a 1-D integer array, got {ids.dtype} {ids.shape}")
        if len(ids) != len(feats):
            raise SolutionError(f"{fpath} has {len(feats)} rows but {ipath} has {len(ids)} ids")
    else:
        id_list, rows = [], []
        with open(fpath, encoding="utf-8") as f:
            for lineno, line in enumerate(tqdm(f, desc=f"read {fpath.name}", unit="line", leave=False,
                                               disable=not sys.stderr.isatty()), 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SolutionError(f"{fpath}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or key not in obj or "feature" not in obj:
                    raise SolutionError(f"{fpath}:{lineno}: expected {{\"{key}\": int, \"feature\": [...]}}")
                if not is_int(obj[key]):
                    raise SolutionError(f"{fpath}:{lineno}: {key} {obj[key]!r} is not an integer")
                id_list.append(obj[key])
                rows.append(obj["feature"])
        if not rows:
            raise SolutionError(f"{fpath} holds no {kind} features")
        try:
            feats = np.asarray(rows, dtype=np.float32)
        except ValueError:
            raise SolutionError(f"{fpath}: features have different lengths or non-numbers") from None
        if feats.ndim != 2:
            raise SolutionError(f"{fpath}: features have different lengths")
        ids = np.asarray(id_list, dtype=np.int64)
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if len(ids) == 0:
        raise SolutionError(f"{fpath} holds no {kind} features")
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1]
        raise SolutionError(f"{fpath}: {len(dup)} {key}s occur more than once (e.g. {int(dup[0])})")
    if not np.isfinite(feats).all():
        bad = int(ids[~np.isfinite(feats).all(1)][0])
        raise SolutionError(f"{fpath}: the feature of {key} {bad} is not finite")
    meta = {}
    if mpath.is_file():
        try:
            meta = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; ignoring it", mpath)
    return FeatureSet(fpath, kind, fmt, ids, feats, meta)
