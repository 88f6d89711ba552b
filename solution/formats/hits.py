"""Per-query hits files: ``BASE.hits.npy`` (``[Q, 3]`` bool: hit at 1 / 5 / 10) beside ``BASE.hits.ids.npy``
(``[Q]`` int64 query ids, the rows' order), each written atomically, the ids first."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from solution.common import SolutionError, write_npy

SUFFIX, IDS_SUFFIX = ".hits.npy", ".hits.ids.npy"


def hits_paths(base: str | os.PathLike) -> tuple[Path, Path]:
    """``(hits file, ids file)`` of ``base`` (a path without suffix, or the ``.hits.npy`` file itself)."""
    s = str(base).removesuffix(SUFFIX)
    return Path(s + SUFFIX), Path(s + IDS_SUFFIX)


def write_hits(base: str | os.PathLike, text_ids, hits) -> Path:
    """Write ``hits`` (``[Q, J]`` booleans) for the queries ``text_ids``; returns the ``.hits.npy`` path."""
    hits = np.asarray(hits, dtype=bool)
    ids = np.asarray(list(text_ids), dtype=np.int64)
    if hits.ndim != 2 or hits.shape[0] != len(ids):
        raise ValueError(f"hits of shape {hits.shape} for {len(ids)} query ids")
    hpath, ipath = hits_paths(base)
    write_npy(ipath, ids)
    write_npy(hpath, hits)
    return hpath


def read_hits(base: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(text_ids [Q] int64, hits [Q, J] bool)``; a missing, unreadable or mismatched pair is a SolutionError."""
    hpath, ipath = hits_paths(base)
    try:
        hits = np.load(hpath, allow_pickle=False)
        ids = np.load(ipath, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SolutionError(f"cannot read per-query hits {hpath}: {e}") from None
    if hits.dtype != bool or hits.ndim != 2 or ids.ndim != 1 or len(ids) != hits.shape[0] or ids.dtype.kind not in "iu":
        raise SolutionError(
            f"{hpath}: expected [Q, J] bool hits and [Q] integer ids, got {hits.dtype}{list(hits.shape)} "
            f"and {ids.dtype}{list(ids.shape)}"
        )
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
