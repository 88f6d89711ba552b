"""Small shared helpers: the user-facing error and :func:`run_cli`, output checks, atomic writes, locks, JSON lines."""

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

log = logging.getLogger("solution")


class SolutionError(Exception):
    """An error caused by the user's input (bad file, unknown name, ...): shown as one line."""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (tests swap it)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; turn a :class:`SolutionError` into one ``error:`` line and exit code 2."""
    setup_logging()
    try:
        main(argv)
    except SolutionError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, no traceback: the input is wrong, not the code
        return 2
    return 0


def check_output(path, *, inputs: Iterable = (), what="output", is_dir=False, own: Callable | None = None) -> Path:
    """``Path(path)``, refused with one line when it is a folder (a file if ``is_dir``), sits under a file, is one
    of ``inputs`` through any spelling or link, or is an existing file ``own`` does not recognise as ours."""
    p = Path(path)
    if own is not None and p.is_file() and not own(p):
        raise SolutionError(f"{what} {p} exists and is not an earlier output of this command; refusing to overwrite it")
    if is_dir and p.exists() and not p.is_dir():
        raise SolutionError(f"{what} {p} is a file, expected a folder")
    if not is_dir and p.is_dir():
        raise SolutionError(f"{what} {p} is a folder, expected a file path")
    parent = next(q for q in p.absolute().parents if q.exists())
    if not parent.is_dir():
        raise SolutionError(f"{what} {p} sits under {parent}, which is a file")
    for src in (Path(x) for x in inputs if x is not None):
        if p.resolve() == src.resolve() or (p.exists() and src.exists() and os.path.samefile(p, src)):
            raise SolutionError(f"{what} {p} is one of the inputs ({src}); refusing to overwrite it")
    return p


def is_disk_full(exc: BaseException, path: str | os.PathLike) -> bool:
    """Whether ``exc``, raised writing under ``path``, means a full disk (also LMDB's and ``torch.save``'s vaguer
    errors while under 1 MiB is free). Ask before cleaning up."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    msg = str(exc).lower()
    if any(w in msg for w in ("no space left", "disk full", "quota exceeded")):
        return True
    if any(w in msg for w in ("input/output error", "unexpected pos", "write failed")):
        existing = next((p for p in (Path(path), *Path(path).absolute().parents) if p.exists()), Path("/"))
        with contextlib.suppress(OSError):
            return shutil.disk_usage(existing).free < (1 << 20)
    return False


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one ``disk full at PATH`` :class:`SolutionError`."""
    try:
        yield
    except SolutionError:
        raise
    except Exception as e:
        if is_disk_full(e, path):
            raise SolutionError(f"disk full at {path}; the previous file, if any, is kept") from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """A temporary path ``.NAME.*.tmp`` beside ``path`` (a folder with ``folder``: it replaces an empty one only),
    renamed onto it (a file after fsync) only if the block succeeds: a kill leaves the old or the new, never half."""
    path = Path(path)
    make_parent(path, f"cannot write {path}: a part of its folder is a file")
    if path.is_dir() and not folder:
        raise SolutionError(f"cannot write {path}: it is a folder")
    temp = dict(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if folder:
        tmp = Path(tempfile.mkdtemp(**temp))
    else:
        fd, name = tempfile.mkstemp(**temp)
        os.close(fd)
        tmp = Path(name)
        umask_mode(tmp)  # before the block: a writer may set its own mode
    try:
        with disk_full_as_error(path):
            yield tmp
            if folder:
                for p in (tmp, *tmp.rglob("*")):  # mkdtemp and some libraries make them private
                    umask_mode(p)
            else:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def make_parent(path: Path, error: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SolutionError(error) from None


def umask_mode(path: Path) -> None:
    """Give a file or folder that ``mkstemp``/``mkdtemp`` (or a library) made private the umask's permissions."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the ``.NAME.*.tmp`` files of killed :func:`atomic_path` writers; only under the folder's lock."""
    folder, removed = Path(folder), []
    for p in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        if p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by a killed writer in %s", len(removed), folder)
    return removed


@contextlib.contextmanager
def folder_lock(lock_file: str | os.PathLike, what: str) -> Iterator[Path]:
    """An exclusive ``flock`` on ``lock_file`` for the block (the kernel drops it when the process dies); a second
    holder fails with one line quoting who holds it."""
    import fcntl

    lock_file = Path(lock_file)
    make_parent(lock_file, f"cannot create {lock_file.parent}: a part of it is a file")
    with open(lock_file, "a+", encoding="utf-8") as f:  # closing releases the flock
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise SolutionError(
                f"{what} is in use by {holder} (lock {lock_file}); wait for it or choose another"
            ) from None
        f.seek(0)
        f.truncate()
        argv = " ".join(sys.argv)[:200]
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} ({argv})")
        f.flush()
        yield lock_file


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def write_npy(path: str | os.PathLike, array) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for n, row in enumerate(rows, 1):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return n


def json_line(path: str | os.PathLike, lineno: int, raw: bytes, last: bool = False):
    """Line ``lineno`` of a JSON-lines file as its value; None when blank or (warned of) a ``last`` line torn by a
    kill; anything else malformed is one error naming the line."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
        return json.loads(line) if line else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        if last:
            log.warning("%s:%d: skipping a last line torn by a kill", path, lineno)
            return None
        what = f"not UTF-8 text (byte {e.start})" if isinstance(e, UnicodeDecodeError) else f"not valid JSON ({e.msg})"
        raise SolutionError(f"{path}:{lineno}: {what}") from None


def read_jsonl(path: str | os.PathLike) -> list:
    """Every value of a JSON-lines file of the user's (:func:`json_line`)."""
    path = Path(path)
    if not path.is_file():
        raise SolutionError(f"file not found: {path}")
    with open(path, "rb") as f:
        return [row for n, raw in enumerate(f, 1) if (row := json_line(path, n, raw)) is not None]


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping; one clear error for a missing or malformed file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SolutionError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SolutionError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise SolutionError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(data, dict):
        raise SolutionError(f"{path}: expected a YAML mapping at the top level")
    return data


def resolve_device(device: str | None = None):
    """``None``/``"auto"`` -> CUDA when available, else CPU. Anything else is passed to torch."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SolutionError(f"--device {device!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SolutionError(f"device {device!r} requested but CUDA is not available")
    return dev
