"""Feature files: the contract between feature extraction and predictions.

For ``PATH`` = ``BASE.npy`` (``--format npy``, the default)::

    BASE.npy          float32 [N, D], L2-normalised rows
    BASE.ids.npy      int64 [N], the image_id / text_id of each row
    BASE.meta.json    provenance: kind, checkpoint (+ sha256), config, prompt, precision, data, validation

and for ``PATH`` = ``BASE.jsonl`` (``--format jsonl``): cn_clip's lines
``{"image_id"|"text_id": int, "feature": [D floats]}`` plus the same ``BASE.meta.json``.
:func:`load_features` reads both (and cn_clip's own JSONL files), refusing duplicate ids,
non-finite values and features of the other kind (text given as image or back) with one clear error.

A path without ``.npy``/``.jsonl`` names what extraction wrote under it: ``BASE.npy`` for npy
(``.npy`` is appended on writing), the path itself for jsonl. Reading it takes ``BASE.npy`` when
that exists, else the JSON lines at the path (when both exist, ``BASE.meta.json`` says which was
written last). :func:`check_outputs` refuses, before any work, outputs that would replace an input,
collide with each other, be a folder or sit under a file. What ``BASE.meta.json`` records about
the model is built by :mod:`solution.retrieval.manifest`.
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

from solution.common import SolutionError, atomic_path, check_output, json_line, write_json

from .muge import is_int

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


def resolve_features(path: str | os.PathLike, kind: str = "") -> tuple[str, Path, Path | None, Path]:
    """``(format, features, ids or None, meta)`` of existing features named ``path``.

    ``*.npy`` is ours, ``*.jsonl`` cn_clip's lines; any other ``BASE`` is ``BASE.npy`` when that
    exists, else JSON lines at ``BASE`` (what extraction writes under that name in either format).
    Refuses a name that matches neither with one line.
    """
    what = f"{kind} features" if kind else "features"
    p = str(path)
    if p.endswith(".npy") or p.endswith(".jsonl"):
        fmt = feature_format(p)
        fpath, ipath, mpath = feature_paths(p, fmt)
        if not fpath.is_file():
            raise SolutionError(f"{what} not found: {fpath}")
        return fmt, fpath, ipath, mpath
    npy, ids, meta = feature_paths(p, "npy")
    plain = Path(p)
    has_npy, has_jsonl = npy.is_file(), plain.is_file()
    if has_npy and has_jsonl:
        fmt = None
        if meta.is_file():
            try:
                fmt = json.loads(meta.read_text(encoding="utf-8")).get("format")
            except (ValueError, OSError, AttributeError):
                fmt = None
        if fmt not in FORMATS:
            raise SolutionError(
                f"{what} {p} is ambiguous: both {npy} and JSON lines at {plain} exist and "
                f"{meta.name} does not say which was written last; give {npy} or a .jsonl name"
            )
        has_npy = fmt == "npy"
    if has_npy:
        return "npy", npy, ids, meta
    if has_jsonl:
        return "jsonl", plain, None, meta
    if plain.is_dir():
        raise SolutionError(f"{what} {p} is a folder, not a feature file (expected {npy} or JSON lines at {p})")
    raise SolutionError(f"{what} not found: neither {npy} nor {plain} exists")


def output_paths(path: str | os.PathLike, fmt: str) -> list[Path]:
    """Every file :func:`save_features` writes for ``path`` in ``fmt`` (features, ids, meta)."""
    return [x for x in feature_paths(path, fmt) if x is not None]


def check_outputs(outputs: dict, fmt: str, inputs=()) -> None:
    """Refuse feature outputs ``{flag: path}`` before anything is computed, with one line: a file
    that would be a folder, sit under a file, replace one of ``inputs``, or be written twice."""
    seen: dict[Path, str] = {}
    for flag, out in outputs.items():
        for path in output_paths(out, fmt):
            check_output(path, inputs=inputs, what=f"{flag} output")
            key = path.resolve()
            if key in seen and seen[key] != flag:
                raise SolutionError(f"{seen[key]} and {flag} both write {path}; give them different names")
            seen[key] = flag


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def save_features(
    path: str | os.PathLike, kind: str, ids, feats, *, fmt: str | None = None, meta: dict | None = None
) -> list[Path]:
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
            f.writelines(json.dumps({key: i, "feature": row}) + "\n" for i, row in zip(ids.tolist(), feats.tolist()))
    meta = {
        "kind": kind,
        "format": "npy" if ipath is not None else "jsonl",
        "count": len(ids),
        "dim": int(feats.shape[1]),
        "features": str(fpath.resolve()),
        **(meta or {}),
    }
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


def _jsonl_record(fpath: Path, lineno: int, raw: bytes, kind: str) -> dict | None:
    """One cn_clip feature line (None when blank); anything else is an error naming the line."""
    key, other = f"{kind}_id", next(k for k in KINDS if k != kind)
    obj = json_line(fpath, lineno, raw)
    if obj is None:
        return None
    if isinstance(obj, dict) and key not in obj and f"{other}_id" in obj:
        raise SolutionError(
            f"{fpath}:{lineno}: holds {other} features ({other}_id), not {kind} "
            f"features: are the image and text feature files swapped?"
        )
    if not isinstance(obj, dict) or key not in obj or "feature" not in obj:
        raise SolutionError(f'{fpath}:{lineno}: expected {{"{key}": int, "feature": [...]}}')
    if not is_int(obj[key]):
        raise SolutionError(f"{fpath}:{lineno}: {key} {obj[key]!r} is not an integer")
    return obj


def _read_jsonl(fpath: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    id_list, rows = [], []
    with open(fpath, "rb") as f:
        for lineno, raw in enumerate(
            tqdm(f, desc=f"read {fpath.name}", unit="line", leave=False, disable=not sys.stderr.isatty()), 1
        ):
            obj = _jsonl_record(fpath, lineno, raw, kind)
            if obj is not None:
                id_list.append(obj[f"{kind}_id"])
                rows.append(obj["feature"])
    if not rows:
        raise SolutionError(f"{fpath} holds no {kind} features")
    try:
        feats = np.asarray(rows, dtype=np.float32)
    except ValueError:
        raise SolutionError(f"{fpath}: features have different lengths or non-numbers") from None
    if feats.ndim != 2:
        raise SolutionError(f"{fpath}: features have different lengths")
    return np.asarray(id_list, dtype=np.int64), feats


def load_features(path: str | os.PathLike, kind: str) -> FeatureSet:
    """Read our ``.npy`` features (+ ``.ids.npy``) or cn_clip's JSONL lines; checks shapes and ids."""
    if kind not in KINDS:
        raise ValueError(kind)
    fmt, fpath, ipath, mpath = resolve_features(path, kind)
    key = f"{kind}_id"
    meta = _read_meta(mpath)
    recorded = meta.get("kind")
    if recorded is not None and recorded != kind:
        raise SolutionError(
            f"{fpath} holds {recorded} features (kind {recorded!r} in {mpath.name}), "
            f"not {kind} features: are the image and text feature files swapped?"
        )
    ids, feats = _read_npy(fpath, ipath) if fmt == "npy" else _read_jsonl(fpath, kind)
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
    return FeatureSet(fpath, kind, fmt, ids, feats, meta)


def _read_meta(mpath: Path) -> dict:
    if not mpath.is_file():
        return {}
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        log.warning("%s is not valid JSON; ignoring it", mpath)
        return {}
    if not isinstance(meta, dict):
        log.warning("%s is not a JSON object; ignoring it", mpath)
        return {}
    return meta
