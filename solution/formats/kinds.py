"""Folder kinds: a run, soup, ensemble or study folder (a marker file, or for older folders a file of their own),
an LMDB split, a MUGE data folder."""

import os
from pathlib import Path

from solution.common import SolutionError

from .run_files import METRICS, PARAMS
from .trials import NAME as TRIALS

MARKER = ".solution-kind"
SOUP_LOG, ENSEMBLE_SPEC = "soup_log.jsonl", "ensemble.json"
SIGNATURES = {"run": (PARAMS, METRICS), "soup": (SOUP_LOG,), "ensemble": (ENSEMBLE_SPEC,), "study": (TRIALS,)}
NOT_INSIDE = ("lmdb", "data")


def folder_kind(folder: str | os.PathLike) -> str | None:
    """The kind of an existing folder, or None (empty, missing, or of no kind the toolkit writes)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    marker = folder / MARKER
    if marker.is_file():
        return marker.read_text(encoding="utf-8").strip() or None
    for kind, names in SIGNATURES.items():
        if any((folder / n).is_file() for n in names):
            return kind
    if (folder / "data.mdb").is_file() or (folder / "imgs" / "data.mdb").is_file():
        return "lmdb"
    if next(folder.glob("*_imgs.tsv"), None) or next(folder.glob("*_texts.jsonl"), None):
        return "data"
    return None


def claim_folder(folder: str | os.PathLike, kind: str, what: str = "--output") -> Path:
    """Mark ``folder`` as ``kind`` (creating it), refused when it is of another kind or lies inside an LMDB split
    or a data folder. Call it before writing anything else there (a lock may then live inside it)."""
    folder = Path(folder)
    have = folder_kind(folder)
    if have not in (None, kind):
        raise SolutionError(f"{what} {folder} is a {have} folder, not a {kind} folder: choose another")
    inside = next((p for p in folder.absolute().parents if folder_kind(p) in NOT_INSIDE), None)
    if inside is not None:
        raise SolutionError(
            f"{what} {folder} lies inside {inside}, a{'n' * (folder_kind(inside) == 'lmdb')} "
            f"{folder_kind(inside)} folder: write outputs elsewhere"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if have is None:
        (folder / MARKER).write_text(kind + "\n", encoding="utf-8")
    return folder
