"""GPUs per trial: a lease is an ``flock`` on ``gpu-{ID}.lock`` in the node's lease folder, dropped by the kernel
when its holder dies, so the workers of a node take disjoint GPUs. A subprocess trial gets its GPUs as its own
``CUDA_VISIBLE_DEVICES`` (and inherits the locks); an in-process trial (one GPU) gets ``--device cuda:K``."""

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


def parse_ids(spec, what: str) -> list[str]:
    """``"0,1,2"`` / ``[0, 1, 2]`` / ``"GPU-8f2e,GPU-11aa"`` -> ``["0", "1", "2"]``; duplicates refused."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    ids = [str(x).strip() for x in items if str(x).strip()]
    bad = next((i for i in ids if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", i)), None)
    if bad is not None:
        raise SolutionError(f"{what}: {bad!r} is not a GPU id (an index such as 0, or a GPU-/MIG- UUID)")
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise SolutionError(f"{what}: GPU {dup} is named twice")
    return ids


def check_gpu_settings(cfg, source: str) -> None:
    """The config's GPU keys, checked with the rest of the config (the GPUs themselves at :func:`gpu_pool`)."""
    n = cfg.gpus_per_trial
    if cfg.gpus is not None:
        parse_ids(cfg.gpus, f"{source}: gpus")
    if not n:
        return
    if cfg.mode == "inprocess" and n > 1:
        raise SolutionError(f"{source}: gpus_per_trial {n} needs mode: subprocess (in-process: one GPU a trial)")
    device = str(cfg.base.get("device") or "auto")
    if device == "cpu":
        raise SolutionError(f"{source}: gpus_per_trial {n} with device cpu (set device: cuda or auto)")
    if cfg.mode == "subprocess" and device.startswith("cuda:") and not cfg.torchrun_nproc:
        raise SolutionError(f"{source}: device {device} names one GPU, but a trial sees only its own: set device: cuda")
    if cfg.torchrun_nproc and cfg.torchrun_nproc != n:
        what = "processes share GPUs" if cfg.torchrun_nproc > n else "some leased GPUs stay idle"
        log.warning("%s: torchrun_nproc %d with gpus_per_trial %d: %s", source, cfg.torchrun_nproc, n, what)


@dataclass
class Lease:
    gpus: list[str]  # the GPUs one trial holds (system ids)
    visible: list[str]  # those this process sees
    fds: list[int]  # the lock files' descriptors

    def env(self, base: dict | None = None) -> dict:  # a child's: base (os.environ) with its CUDA_VISIBLE_DEVICES
        return {**(os.environ if base is None else base), ENV: ",".join(self.gpus)}

    @property
    def device(self) -> str:  # the in-process trial's: its GPU as this process numbers it
        return f"cuda:{self.visible.index(self.gpus[0])}"


class GpuPool:
    """The GPUs a worker may lease, ``per_trial`` at a time, through lock files in ``lease_dir``."""

    def __init__(self, gpus: list[str], per_trial: int, lease_dir, visible: list[str] | None = None, poll=1.0):
        self.gpus, self.per_trial, self.lease_dir = list(gpus), per_trial, Path(lease_dir)
        self.visible, self.poll = list(gpus if visible is None else visible), poll

    @contextlib.contextmanager
    def lease(self, label: str, sleep: Callable[[float], None] = time.sleep) -> Iterator[Lease]:
        """``per_trial`` free GPUs for the ``with`` block (waiting while other trials hold them)."""
        try:
            self.lease_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SolutionError(f"GPU lease folder {self.lease_dir}: {e.strerror or e}") from None
        held = self._try(label)
        if held is None:
            log.info("%s: waiting for %d free GPU(s) of %s", label, self.per_trial, ",".join(self.gpus))
        while held is None:
            sleep(self.poll)
            held = self._try(label)
        try:
            yield Lease([g for g, _ in held], self.visible, [fd for _, fd in held])
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


def gpu_pool(cfg, env: dict | None = None) -> GpuPool | None:
    """The worker's pool (None without ``gpus_per_trial``): ``gpus``, else ``CUDA_VISIBLE_DEVICES``, else all."""
    if not cfg.gpus_per_trial:
        return None
    env = os.environ if env is None else env
    if env.get(ENV) is not None:
        visible, origin = parse_ids(env[ENV], ENV), ENV
    else:
        import torch

        visible, origin = [str(i) for i in range(torch.cuda.device_count())], "torch.cuda.device_count()"
    gpus = visible if cfg.gpus is None else parse_ids(cfg.gpus, "gpus")
    stray = [g for g in gpus if g not in visible] if cfg.gpus is not None and env.get(ENV) is not None else []
    if stray:
        raise SolutionError(f"gpus: GPU {stray[0]} is not among this worker's {ENV}={','.join(visible)}")
    if cfg.gpus_per_trial > len(gpus):
        raise SolutionError(
            f"gpus_per_trial {cfg.gpus_per_trial} exceeds the {len(gpus)} GPU(s) this worker may use "
            f"({','.join(gpus) or 'none'}, from {'--gpus' if cfg.gpus is not None else origin})"
        )
    if cfg.mode == "inprocess" and any(g not in visible for g in gpus):
        raise SolutionError(f"gpus: an in-process trial can only use GPUs this process sees ({','.join(visible)})")
    lease_dir = Path(cfg.gpu_lease_dir or Path(tempfile.gettempdir()) / f"solution-gpu-leases-{os.getuid()}")
    log.info("GPUs: %d per trial from %s (leases in %s)", cfg.gpus_per_trial, ",".join(gpus), lease_dir)
    return GpuPool(gpus, cfg.gpus_per_trial, lease_dir, visible)
