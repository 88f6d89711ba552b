"""Where ``solution.prepare`` writes, and how it never destroys what is already there.

* **LMDB splits.** Each run locks every split it writes (``LMDB_DIR/.{split}.lock``, an ``flock``
  the kernel drops when its process dies), builds each one in a temp folder of its own
  (``LMDB_DIR/.{split}.building.XXXXXXXX``) and swaps them in only when every split of the run is
  built. A second run on a split in use fails with one line naming the holder; a failed or killed
  run leaves the previous LMDB as it was (a killed run's temp folder is removed by the next one).
  A full disk is said as ``disk full at LMDB_DIR``; the partial temp folders are removed.
  A ``LMDB_DIR/{split}`` that is not an LMDB split (anything besides ``imgs``, ``pairs``,
  ``report.json``: e.g. a folder of the user's images) is never replaced.
* **MUGE files** (formats 2/3 write ``DATA_DIR/{split}_imgs.tsv`` and ``{split}_texts.jsonl``):
  written only where no file is, or over a file an earlier prepare wrote and nobody changed since
  (recorded by size and modification time in ``DATA_DIR/.prepare_written.json``). A file of the
  user's there (e.g. a MUGE download) is refused before any work, never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from solution.common import SolutionError, check_output, folder_lock, is_disk_full, write_json

log = logging.getLogger(__name__)

SPLIT_ENTRIES = {"imgs", "pairs", "report.json"}  # what a split folder prepare (or cn_clip's builder) writes holds
MANIFEST = ".prepare_written.json"  # the MUGE files prepare wrote into a --data-dir: name -> [size, mtime_ns]


def check_split_name(name: str) -> str:
    """A split name is one plain folder name (it becomes ``LMDB_DIR/NAME`` and ``DATA_DIR/NAME_*``)."""
    if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise SolutionError(f"split name {name!r} is not a plain name (letters, digits, '_', '-')")
    return name


def check_split_dir(final: Path) -> None:
    """Refuse to replace ``final`` unless it is absent or an LMDB split (see :data:`SPLIT_ENTRIES`)."""
    check_output(final, is_dir=True, what="LMDB split")
    if final.is_dir():
        other = sorted(set(os.listdir(final)) - SPLIT_ENTRIES)
        if other:
            shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
            raise SolutionError(
                f"{final} holds {shown}: not an LMDB split (only imgs, pairs, report.json); "
                f"refusing to replace it, choose another --lmdb-dir"
            )


def _recover(lmdb_dir: Path, name: str) -> None:
    """Under the split's lock: remove what a killed run left (temp folders), put back a split that a
    run killed between its two renames left as ``.NAME.old``."""
    stale = re.compile(rf"\.{re.escape(name)}\.building(\.[a-z0-9_]{{8}})?")
    for p in lmdb_dir.iterdir():
        if stale.fullmatch(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, left by a prepare that did not finish", p)
    final, old = lmdb_dir / name, lmdb_dir / f".{name}.old"
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)
            log.warning("restored %s from %s (a prepare was killed while swapping it in)", final, old.name)


def _swap_in(tmp: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building(lmdb_dir: Path, names: Sequence[str]) -> Iterator[dict[str, Path]]:
    """Lock the splits ``names`` of ``lmdb_dir``, yield ``{name: temp folder}`` to build them in, and
    swap them all in when the block succeeds; on any error the previous splits stay as they were."""
    for name in names:  # a refusal before the locks leaves not even a lock file
        check_split_dir(lmdb_dir / name)
    with contextlib.ExitStack() as locks:
        for name in sorted(set(names)):
            locks.enter_context(folder_lock(lmdb_dir / f".{name}.lock", f"LMDB split {lmdb_dir / name}"))
        for name in names:
            _recover(lmdb_dir, name)
            check_split_dir(lmdb_dir / name)
        umask = os.umask(0)
        os.umask(umask)
        tmps: dict[str, Path] = {}
        try:
            try:
                for name in names:
                    tmps[name] = Path(tempfile.mkdtemp(prefix=f".{name}.building.", suffix="", dir=lmdb_dir))
                    os.chmod(tmps[name], 0o777 & ~umask)  # mkdtemp makes 0700; a split gets normal permissions
                yield tmps
            except SolutionError:
                raise
            except Exception as e:
                if is_disk_full(e, lmdb_dir):  # asked before the partial folders are removed
                    raise SolutionError(
                        f"disk full at {lmdb_dir}: the previous LMDB split(s) "
                        f"{', '.join(names)} are kept, the partial ones removed"
                    ) from None
                raise
            for name, tmp in tmps.items():
                _swap_in(tmp, lmdb_dir / name)
        finally:
            for tmp in tmps.values():
                shutil.rmtree(tmp, ignore_errors=True)


def write_report(path: Path, report: dict) -> None:
    """``report.json`` in a split's temp folder: no temp file of its own (the folder is swapped in
    whole), and an error (a full disk) is said for the split by :func:`building`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- MUGE files (formats 2/3)


def _written(data_dir: Path) -> dict:
    try:
        rec = json.loads((data_dir / MANIFEST).read_text(encoding="utf-8"))
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _stamp(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def _check_muge(data_dir: Path, names: Sequence[str], inputs: list[Path]) -> dict:
    check_output(data_dir, is_dir=True, what="--data-dir")
    written = _written(data_dir)
    for name in names:
        for p in (data_dir / f"{name}_imgs.tsv", data_dir / f"{name}_texts.jsonl"):
            check_output(p, inputs=inputs, what="MUGE output")
            if p.exists() and written.get(p.name) != _stamp(p):
                raise SolutionError(
                    f"{p} already exists and was not written by prepare (or was changed since); "
                    f"refusing to overwrite it: give another --data-dir for the MUGE files, "
                    f"or move it away"
                )
    return written


@contextlib.contextmanager
def muge_output(
    data_dir: Path, names: Sequence[str], inputs: Iterable[Path]
) -> Iterator[Callable[[Sequence[str]], None]]:
    """Lock ``data_dir`` for writing the MUGE files of ``names``; refuse (before any work) a file
    there that prepare did not write; yield ``record(names)``, to call once those files are in place."""
    inputs = list(inputs)
    _check_muge(data_dir, names, inputs)  # before the lock: a refusal leaves not even a lock file
    with folder_lock(data_dir / ".prepare.lock", f"--data-dir {data_dir}"):
        written = _check_muge(data_dir, names, inputs)

        def record(done: Sequence[str]) -> None:
            for name in done:
                for p in (data_dir / f"{name}_imgs.tsv", data_dir / f"{name}_texts.jsonl"):
                    if p.is_file():
                        written[p.name] = _stamp(p)
            write_json(data_dir / MANIFEST, written)

        yield record
