"""GPUs per trial: each running trial leases its own GPUs; the workers of one node share a lease folder.

With ``gpus_per_trial: N`` (``--gpus-per-trial N``) a worker leases N of the GPUs it may use
(``gpus``/``--gpus 0,1,2,3``; default: this process's ``CUDA_VISIBLE_DEVICES``, else
``0 .. torch.cuda.device_count() - 1``) for each trial, waits while the others hold them, and gives
them back when the trial ends, however it ends. A lease is an ``flock`` on ``gpu-{ID}.lock`` in the
lease folder (``gpu_lease_dir``; default ``{tmp}/solution-gpu-leases-{uid}``, local to the node), so
the kernel drops it when its holder dies (``kill -9`` included): no stale lease outlives a worker, and
all workers of the node (any study) that use the same folder take disjoint GPUs. A subprocess or
torchrun trial gets them through ``CUDA_VISIBLE_DEVICES`` in its own environment only (and inherits
the lock, so the GPUs stay leased until the child itself has exited); an in-process trial (one GPU)
gets ``--device cuda:K``, K the GPU's index among those this process sees. The ids are the system's,
as ``CUDA_VISIBLE_DEVICES`` writes them (indices or ``GPU-``/``MIG-`` UUIDs).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from solution.common import SolutionError

log = logging.getLogger(__name__)

ENV = "CUDA_VISIBLE_DEVICES"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def default_lease_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"solution-gpu-leases-{os.getuid()}"


def parse_ids(spec, what: str) -> list[str]:
    """``"0,1,2"`` / ``[0, 1, 2]`` / ``"GPU-8f2e,GPU-11aa"`` -> ``["0", "1", "2"]``; duplicates refused."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    ids = [str(x).strip() for x in items if str(x).strip()]
    for i in ids:
        if not _ID.match(i):
            raise SolutionError(f"{what}: {i!r} is not a GPU id (an index such as 0, or a GPU-/MIG- UUID)")
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise SolutionError(f"{what}: GPU {dup} is named twice")
    return ids


def visible_gpus(env: dict | None = None) -> tuple[list[str], str]:
    """The GPUs this process sees, as system ids, and where that came from."""
    env = os.environ if env is None else env
    if env.get(ENV) is not None:
        return parse_ids(env[ENV], ENV), ENV
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        n = 0
    return [str(i) for i in range(n)], "torch.cuda.device_count()"


def check_gpu_settings(cfg, source: str) -> None:
    """The config's GPU keys, checked with the rest of the config (the GPUs themselves at :func:`gpu_pool`)."""
    n = cfg.gpus_per_trial
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise SolutionError(f"{source}: gpus_per_trial must be a non-negative integer, got {n!r}")
    if cfg.gpus is not None:
        parse_ids(cfg.gpus, f"{source}: gpus")
    if not n:
        if cfg.gpus is not None:
            log.warning("%s: gpus %s is given but gpus_per_trial is 0: no GPU is leased", source, cfg.gpus)
        return
    if cfg.mode == "inprocess" and n > 1:
        raise SolutionError(
            f"{source}: gpus_per_trial {n} needs mode: subprocess (an in-process trial runs on one "
            f"GPU; several GPUs per trial: torchrun_nproc: {n})"
        )
    device = str(cfg.base.get("device") or "auto")
    if device == "cpu":
        raise SolutionError(f"{source}: gpus_per_trial {n} with device cpu (set device: cuda or auto)")
    if cfg.mode == "subprocess" and device.startswith("cuda:") and not cfg.torchrun_nproc:
        raise SolutionError(
            f"{source}: device {device} names one GPU, but each trial sees only its own GPUs "
            f"(as cuda:0..{n - 1}): set device: cuda"
        )
    if cfg.torchrun_nproc and cfg.torchrun_nproc != n:
        log.warning(
            "%s: torchrun_nproc %d with gpus_per_trial %d: %s",
            source,
            cfg.torchrun_nproc,
            n,
            "processes share GPUs" if cfg.torchrun_nproc > n else "some leased GPUs stay idle",
        )


@dataclass
class Lease:
    """The GPUs one trial holds (system ids), and how its process is told."""

    gpus: list[str]
    visible: list[str]
    fds: list[int]

    def env(self, base: dict | None = None) -> dict:
        """A child's environment: ``base`` (default ``os.environ``) with its ``CUDA_VISIBLE_DEVICES``."""
        return {**(os.environ if base is None else base), ENV: ",".join(self.gpus)}

    @property
    def device(self) -> str:
        """The in-process trial's device: its GPU as this process numbers it."""
        return f"cuda:{self.visible.index(self.gpus[0])}"


class GpuPool:
    """The GPUs a worker may lease, ``per_trial`` at a time, through lock files in ``lease_dir``."""

    def __init__(
        self,
        gpus: list[str],
        per_trial: int,
        lease_dir: str | os.PathLike,
        visible: list[str] | None = None,
        poll: float = 1.0,
    ):
        self.gpus, self.per_trial, self.lease_dir = list(gpus), per_trial, Path(lease_dir)
        self.visible = list(gpus if visible is None else visible)
        self.poll = poll

    @contextlib.contextmanager
    def lease(self, label: str, sleep: Callable[[float], None] = time.sleep) -> Iterator[Lease]:
        """``per_trial`` free GPUs for the ``with`` block (waiting while other trials hold them)."""
        try:
            self.lease_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SolutionError(f"GPU lease folder {self.lease_dir}: {e.strerror or e}") from None
        waited = False
        while True:
            held = self._try(label)
            if held is not None:
                break
            if not waited:
                log.info(
                    "%s: waiting for %d free GPU(s) of %s (held: %s)",
                    label,
                    self.per_trial,
                    ",".join(self.gpus),
                    "; ".join(self.holders()) or "?",
                )
                waited = True
            sleep(self.poll)
        lease = Lease([g for g, _ in held], self.visible, [fd for _, fd in held])
        try:
            yield lease
        finally:
            for _, fd in held:
                os.close(fd)  # closing drops the flock

    def _try(self, label: str) -> list[tuple[str, int]] | None:
        """Lock ``per_trial`` free GPUs, or none (all taken back) when fewer are free."""
        held: list[tuple[str, int]] = []
        for gpu in self.gpus:
            fd = os.open(self.lease_dir / f"gpu-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}: {label}\n".encode(), 0)
            held.append((gpu, fd))
            if len(held) == self.per_trial:
                return held
        for _, fd in held:
            os.close(fd)
        return None

    def holders(self) -> list[str]:
        """``GPU: holder`` for each GPU of the pool whose lock is held now."""
        out = []
        for gpu in self.gpus:
            path = self.lease_dir / f"gpu-{gpu}.lock"
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                out.append(f"GPU {gpu}: {path.read_text(errors='replace').strip()}")
            finally:
                os.close(fd)
        return out


def gpu_pool(cfg, env: dict | None = None) -> GpuPool | None:
    """The worker's pool for ``cfg`` (None when ``gpus_per_trial`` is 0); one error line when it cannot
    serve a trial."""
    if not cfg.gpus_per_trial:
        return None
    visible, origin = visible_gpus(env)
    gpus = visible if cfg.gpus is None else parse_ids(cfg.gpus, "gpus")
    if cfg.gpus is not None and (env if env is not None else os.environ).get(ENV) is not None:
        stray = [g for g in gpus if g not in visible]
        if stray:
            raise SolutionError(f"gpus: GPU {stray[0]} is not among this worker's {ENV}={','.join(visible)}")
    if cfg.gpus_per_trial > len(gpus):
        where = "--gpus" if cfg.gpus is not None else origin
        raise SolutionError(
            f"gpus_per_trial {cfg.gpus_per_trial} exceeds the {len(gpus)} GPU(s) this worker may use "
            f"({','.join(gpus) or 'none'}, from {where})"
        )
    if cfg.mode == "inprocess" and any(g not in visible for g in gpus):
        raise SolutionError(
            f"gpus: an in-process trial can only use GPUs this process sees ({','.join(visible) or 'none'})"
        )
    lease_dir = Path(cfg.gpu_lease_dir) if cfg.gpu_lease_dir else default_lease_dir()
    log.info("GPUs: %d per trial from %s (leases in %s)", cfg.gpus_per_trial, ",".join(gpus), lease_dir)
    return GpuPool(gpus, cfg.gpus_per_trial, lease_dir, visible)
