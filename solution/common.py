"""Small shared helpers: logging, the user-facing error type, atomic writes, devices, JSON lines.

Every CLI in the package goes through :func:`run_cli`, so a bad input ends as one clear
``error: ...`` line and exit code 2 instead of a traceback.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

log = logging.getLogger("solution")


class SolutionError(Exception):
    """An error caused by the user's input (bad file, unknown name, ...): shown as one line."""


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_solution", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._solution = True  # type: ignore[attr-defined]
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


# ---------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash (or ``kill -9``) at any moment leaves either the old file or the new one, never half.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; a malformed line is a :class:`SolutionError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise SolutionError(f"file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SolutionError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


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
    if not isinstance(data, dict):
        raise SolutionError(f"{path}: expected a YAML mapping at the top level")
    return data


# ---------------------------------------------------------------- devices


def resolve_device(device: str | None = None):
    """``None``/``"auto"`` -> CUDA when available, else CPU. Anything else is passed to torch."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SolutionError(f"device {device!r} requested but CUDA is not available")
    return dev


def autocast_context(device, precision: str):
    """Autocast for ``amp``/``fp16`` (fp16 on GPU) and ``bf16``; nothing for ``fp32``."""
    import torch

    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("amp", "fp16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
