"""Feature files, the contract between extraction and predictions: ``BASE.npy`` (float32 [N, D], L2-normalised
rows) + ``BASE.ids.npy`` (int64 [N]) + ``BASE.meta.json`` (provenance), or cn_clip's JSON lines ``{"image_id"|
"text_id": int, "feature": [D floats]}`` at a ``.jsonl`` path + the same meta. A name without ``.npy``/``.jsonl``:
what extraction wrote under it, ``BASE.npy`` or JSON lines at the name (both: the meta says which came last)."""

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from solution.common import SolutionError, check_output, json_line, write_json, write_jsonl, write_npy

from .muge import is_int

log = logging.getLogger(__name__)

FORMATS = ("npy", "jsonl")
SWAPPED = "are the image and text feature files swapped?"
KINDS = ("image", "text")


def feature_paths(path: str | os.PathLike, fmt: str | None = None) -> tuple[Path, Path | None, Path]:
    """``(features, ids or None, meta)`` of a feature output: npy ``BASE.npy`` (``.npy`` appended when missing),
    ``BASE.ids.npy``, ``BASE.meta.json``; jsonl: the path itself, no ids file, ``BASE.meta.json``."""
    p = str(path)
    fmt = fmt or ("npy" if p.endswith(".npy") else "jsonl")
    base = p.removesuffix(".npy") if p.endswith(".npy") else p.removesuffix(".jsonl")
    if fmt == "npy":
        return Path(base + ".npy"), Path(base + ".ids.npy"), Path(base + ".meta.json")
    if fmt != "jsonl":
        raise SolutionError(f"unknown feature format {fmt!r}; choose from {', '.join(FORMATS)}")
    if p.endswith(".npy"):
        raise SolutionError(f"{path}: a .npy path cannot hold jsonl features; name it .jsonl")
    return Path(path), None, Path(base + ".meta.json")


def resolve_features(path: str | os.PathLike, kind: str = "") -> tuple[str, Path, Path | None, Path]:
    """``(format, features, ids or None, meta)`` of existing features named ``path``; one line when there are none."""
    what, p = f"{kind} features" if kind else "features", str(path)
    if p.endswith((".npy", ".jsonl")):
        fmt = "npy" if p.endswith(".npy") else "jsonl"
        fpath, ipath, mpath = feature_paths(p, fmt)
        if not fpath.is_file():
            raise SolutionError(f"{what} not found: {fpath}")
        return fmt, fpath, ipath, mpath
    npy, ids, meta = feature_paths(p, "npy")
    found = [fmt for fmt, f in (("npy", npy), ("jsonl", Path(p))) if f.is_file()]
    if len(found) == 2:
        found = [_read_meta(meta).get("format") if meta.is_file() else None]
        if found[0] not in FORMATS:
            raise SolutionError(
                f"{what} {p} is ambiguous: both {npy} and JSON lines at {p} exist and {meta.name} does not say "
                f"which was written last; give {npy} or a .jsonl name"
            )
    if found:
        return ("npy", npy, ids, meta) if found[0] == "npy" else ("jsonl", Path(p), None, meta)
    if Path(p).is_dir():
        raise SolutionError(f"{what} {p} is a folder, not a feature file (expected {npy} or JSON lines at {p})")
    raise SolutionError(f"{what} not found: neither {npy} nor {p} exists")


def check_outputs(outputs: dict, fmt: str, inputs=(), own=None) -> None:
    """Refuse feature outputs ``{flag: path}`` before anything is computed, with one line: each file as
    :func:`~solution.common.check_output` refuses it, or one written twice."""
    seen: dict[Path, str] = {}
    for flag, out in outputs.items():
        for path in (x for x in feature_paths(out, fmt) if x is not None):
            check_output(path, inputs=inputs, what=f"{flag} output", own=own)
            if seen.setdefault(path.resolve(), flag) != flag:
                raise SolutionError(f"{seen[path.resolve()]} and {flag} both write {path}; give them different names")


def save_features(path, kind: str, ids, feats, *, fmt: str | None = None, meta: dict | None = None) -> list[Path]:
    """Write features (each file atomically); returns the paths written (features first)."""
    ids, feats = np.asarray(ids, dtype=np.int64), np.ascontiguousarray(feats, dtype=np.float32)
    if feats.ndim != 2 or len(ids) != len(feats):
        raise ValueError(f"{len(ids)} ids for features of shape {feats.shape}")
    fpath, ipath, mpath = feature_paths(path, fmt)
    if ipath is not None:
        write_npy(ipath, ids)
        write_npy(fpath, feats)
    else:
        write_jsonl(fpath, ({f"{kind}_id": i, "feature": row} for i, row in zip(ids.tolist(), feats.tolist())))
    info = {"kind": kind, "format": "jsonl" if ipath is None else "npy", "count": len(ids), "dim": feats.shape[1]}
    write_json(mpath, {**info, "features": str(fpath.resolve()), **(meta or {})})
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


def _read_npy(fpath: Path, ipath: Path) -> tuple[np.ndarray, np.ndarray]:
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
    return ids, feats


def _read_jsonl(fpath: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    key, other = f"{kind}_id", next(k for k in KINDS if k != kind)
    ids, rows = [], []
    with open(fpath, "rb") as f:
        for n, raw in enumerate(tqdm(f, desc=f"read {fpath.name}", leave=False, disable=not sys.stderr.isatty()), 1):
            obj = json_line(fpath, n, raw)
            if obj is None:
                continue
            if isinstance(obj, dict) and key not in obj and f"{other}_id" in obj:
                raise SolutionError(f"{fpath}:{n}: holds {other} features ({other}_id), not {kind} features: {SWAPPED}")
            if not isinstance(obj, dict) or key not in obj or "feature" not in obj:
                raise SolutionError(f'{fpath}:{n}: expected {{"{key}": int, "feature": [...]}}')
            if not is_int(obj[key]):
                raise SolutionError(f"{fpath}:{n}: {key} {obj[key]!r} is not an integer")
            ids.append(obj[key])
            rows.append(obj["feature"])
    try:
        feats = np.asarray(rows, dtype=np.float32)
    except ValueError:
        feats = None
    if feats is None or (rows and feats.ndim != 2):
        raise SolutionError(f"{fpath}: features have different lengths or non-numbers")
    return np.asarray(ids, dtype=np.int64), feats


def load_features(path: str | os.PathLike, kind: str) -> FeatureSet:
    """Read our ``.npy`` features (+ ``.ids.npy``) or cn_clip's JSON lines: refuses features of the other kind
    (image and text swapped), repeated ids and non-finite values, with one line."""
    fmt, fpath, ipath, mpath = resolve_features(path, kind)
    key, meta = f"{kind}_id", _read_meta(mpath) if mpath.is_file() else {}
    if meta.get("kind", kind) != kind:
        what = f"{meta['kind']} features (kind {meta['kind']!r} in {mpath.name})"
        raise SolutionError(f"{fpath} holds {what}, not {kind} features: {SWAPPED}")
    ids, feats = _read_npy(fpath, ipath) if fmt == "npy" else _read_jsonl(fpath, kind)
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if len(ids) == 0:
        raise SolutionError(f"{fpath} holds no {kind} features")
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1]
        raise SolutionError(f"{fpath}: {len(dup)} {key}s occur more than once (e.g. {int(dup[0])})")
    if not np.isfinite(feats).all():
        raise SolutionError(f"{fpath}: the feature of {key} {int(ids[~np.isfinite(feats).all(1)][0])} is not finite")
    return FeatureSet(fpath, kind, fmt, ids, feats, meta)


def _read_meta(mpath: Path) -> dict:
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        meta = None
    if not isinstance(meta, dict):
        log.warning("%s is not a JSON object; ignoring it", mpath)
        return {}
    return meta
