"""Per-query hits files: ``BASE.hits.npy`` (``[Q, 3]`` bool: hit at 1 / 5 / 10), ``BASE.hits.ids.npy`` (``[Q]`` int64
query ids, the rows' order) and ``BASE.hits.sha256`` (:func:`array_digest` of both, checked on read; files
written before digests read without one), each written atomically."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from solution.common import SolutionError, atomic_path, write_npy

SUFFIX, IDS_SUFFIX, DIGEST_SUFFIX = ".hits.npy", ".hits.ids.npy", ".hits.sha256"


def array_digest(*arrays) -> str:
    """sha256 of arrays' dtypes, shapes and bytes: tells a file replaced or changed since it was written."""
    h = hashlib.sha256()
    for a in map(np.ascontiguousarray, arrays):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def hits_paths(base: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(hits, ids, digest)`` files of ``base`` (a path without suffix, or the ``.hits.npy`` file itself)."""
    s = str(base).removesuffix(SUFFIX)
    return Path(s + SUFFIX), Path(s + IDS_SUFFIX), Path(s + DIGEST_SUFFIX)


def write_hits(base: str | os.PathLike, text_ids, hits) -> Path:
    """Write ``hits`` (``[Q, J]`` booleans) for the queries ``text_ids``; returns the ``.hits.npy`` path."""
    hits = np.asarray(hits, dtype=bool)
    ids = np.asarray(list(text_ids), dtype=np.int64)
    if hits.ndim != 2 or hits.shape[0] != len(ids):
        raise ValueError(f"hits of shape {hits.shape} for {len(ids)} query ids")
    hpath, ipath, dpath = hits_paths(base)
    dpath.unlink(missing_ok=True)  # a kill before the new digest leaves none, not the old one over new arrays
    write_npy(ipath, ids)
    write_npy(hpath, hits)
    with atomic_path(dpath) as tmp:
        tmp.write_text(array_digest(ids, hits) + "\n", encoding="utf-8")
    return hpath


def read_hits(base: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(text_ids [Q] int64, hits [Q, J] bool)``; a missing, unreadable, mismatched or changed pair is one error."""
    hpath, ipath, dpath = hits_paths(base)
    try:
        hits = np.load(hpath, allow_pickle=False)
        ids = np.load(ipath, allow_pickle=False)
        digest = dpath.read_text(encoding="utf-8").strip() if dpath.is_file() else None
    except (OSError, ValueError) as e:
        raise SolutionError(f"cannot read per-query hits {hpath}: {e}") from None
    if hits.dtype != bool or hits.ndim != 2 or ids.ndim != 1 or len(ids) != hits.shape[0] or ids.dtype.kind not in "iu":
        raise SolutionError(
            f"{hpath}: expected [Q, J] bool hits and [Q] integer ids, got {hits.dtype}{list(hits.shape)} "
            f"and {ids.dtype}{list(ids.shape)}"
        )
    if digest is not None and digest != array_digest(ids.astype(np.int64), hits):
        raise SolutionError(f"{hpath}: the hits or their ids changed since they were written (digest {dpath.name})")
    return ids.astype(np.int64), hits


def align(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> np.ndarray | None:
    """``b``'s hits reordered to ``a``'s query ids (each ``(ids, hits)``); None when the query sets differ."""
    (a_ids, _), (b_ids, b_hits) = a, b
    if len(a_ids) != len(b_ids):
        return None
    if np.array_equal(a_ids, b_ids):
        return b_hits
    pos = {int(t): i for i, t in enumerate(b_ids.tolist())}
    if len(pos) != len(b_ids) or any(int(t) not in pos for t in a_ids.tolist()):
        return None
    return b_hits[[pos[int(t)] for t in a_ids.tolist()]]
