"""One search trial: an ordinary training run in ``{study folder}/trials/{number:04d}/``, reported to Optuna at
each validation of the main set and pruned on it; in this process (``on_validation``) or a child (``python -m
solution.train``, a ``launcher``, torchrun) whose ``metrics.jsonl`` is tailed. A live worker records ``fail_reason``."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import yaml

from solution.common import SolutionError, atomic_path
from solution.formats.run_files import BEST_CHECKPOINT, METRICS, MetricsTail, is_main_valid
from solution.formats.trials import RUNS, trial_dir

from .gpus import GpuPool, Lease
from .search_config import SearchConfig, flags_to_argv, suggest_params, trial_flags
from .storage import requeue, worker_info

log = logging.getLogger(__name__)


class Objective:
    """What ``study.optimize`` calls: one training per trial; its value is the best reported validation."""

    def __init__(self, cfg: SearchConfig, train_main: Callable | None = None, pool: GpuPool | None = None):
        self.cfg, self.train_main, self.pool = cfg, train_main, pool
        self.trials_dir = cfg.study_dir / RUNS

    def __call__(self, trial: optuna.Trial) -> float:
        run_dir = trial_dir(self.cfg.study_dir, trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", worker_info())  # one write: a dead worker's trials are recognised
        self.values, self.reported = [], set()
        try:
            self._run(trial, run_dir)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: not the trial's fault, so not counted and re-queued
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C / SIGTERM)")
            requeue(trial.study, trial)
            raise
        except SystemExit as e:  # a train function that exits (ours raises FlagError for a bad flag)
            trial.set_user_attr("fail_reason", f"trainer exited with code {e.code}")
            raise SolutionError(trial.user_attrs["fail_reason"]) from None
        except BaseException as e:
            text = str(e) if isinstance(e, SolutionError) else f"{type(e).__name__}: {e}".strip()
            trial.set_user_attr("fail_reason", text[:500])
            raise
        if (run_dir / BEST_CHECKPOINT).is_file():
            trial.set_user_attr("best_checkpoint", str(run_dir / BEST_CHECKPOINT))
        return max(self.values) if self.cfg.direction == "maximize" else min(self.values)

    def _run(self, trial: optuna.Trial, run_dir: Path) -> None:
        """Sample the parameters, lease the GPUs, run the training, insist on at least one validation."""
        cfg = self.cfg
        params = suggest_params(trial, cfg.space)
        flags = {**trial_flags(cfg, params), "logs": str(self.trials_dir), "name": run_dir.name}
        log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in params.items()) or "(no params)")
        leased = self.pool.lease(f"study {cfg.name} trial {trial.number}") if self.pool else contextlib.nullcontext()
        with leased as lease:  # given back however the trial ends (a dead worker's: by the kernel)
            if lease is not None:
                gpus = ",".join(lease.gpus)
                if cfg.mode == "inprocess":
                    flags["device"] = lease.device
                trial.set_user_attr("gpus", gpus)
                how = f"--device {lease.device}" if cfg.mode == "inprocess" else f"CUDA_VISIBLE_DEVICES={gpus}"
                log.info("trial %d: GPU(s) %s (%s)", trial.number, gpus, how)
            argv = flags_to_argv(flags)
            if run_dir.is_dir() and any(run_dir.iterdir()):  # the trainer would resume a stale epoch_latest.pt
                aside = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
                log.warning("%s exists from an earlier study: moved to %s", run_dir, aside.name)
                run_dir.rename(aside)
            trial.set_user_attr("argv", argv)
            if cfg.mode == "inprocess":
                self._run_inprocess(trial, argv)
            else:
                self._run_subprocess(trial, self._command(argv, flags, run_dir), run_dir, lease)
        if not self.values:
            raise SolutionError("the run reported no validation (give --val-data and a validation interval)")

    def on_record(self, trial: optuna.Trial, record: dict) -> None:
        """One metrics.jsonl record: report a main-set validation (once per step) and prune if asked."""
        value, step = record.get("mean_recall"), record.get(self.cfg.report_at)
        if not is_main_valid(record) or value is None or step is None:
            return
        value, step = float(value), int(step)
        if not math.isfinite(value):
            raise SolutionError(f"validation mean_recall is {value} at {self.cfg.report_at} {step}")
        self.values.append(value)
        if step in self.reported:
            return
        self.reported.add(step)
        trial.report(value, step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at", step)
            raise optuna.TrialPruned(f"mean_recall={value:.2f} at {self.cfg.report_at} {step}")

    def _run_inprocess(self, trial: optuna.Trial, argv: list[str]) -> None:
        train_main = self.train_main
        if train_main is None:
            from solution.training.trainer import main as train_main
        try:
            train_main(argv, on_validation=lambda record: self.on_record(trial, record))
        finally:
            gc.collect()
            import torch

            torch.cuda.empty_cache()  # a no-op without CUDA

    def _command(self, argv: list[str], flags: dict, run_dir: Path) -> list[str]:
        """The child's command line: the launcher, torchrun, or ``python -m solution.train``."""
        cfg = self.cfg
        if cfg.launcher:
            return [*map(str, cfg.launcher), *argv]
        if not cfg.torchrun_nproc:
            return [sys.executable, "-m", "solution.train", *argv]
        # torchrun's parser would take trainer flags such as --logs: they go through the trainer's --config
        config = self.trials_dir / f"{run_dir.name}.yaml"
        with atomic_path(config) as tmp:
            kept = {k: v for k, v in flags.items() if v is not None}  # false: the trainer's --no-X where on by default
            tmp.write_text(yaml.safe_dump(kept, allow_unicode=True, sort_keys=False), encoding="utf-8")
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.torchrun_nproc}"]
        return [*run, "-m", "solution.train", "--config", str(config)]

    def _run_subprocess(self, trial: optuna.Trial, cmd: list[str], run_dir: Path, lease: Lease | None) -> None:
        """Run ``cmd`` (output in ``trials/NNNN.log``; a ``lease``'s GPUs and locks), reporting its metrics."""
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.trials_dir / f"{run_dir.name}.log"
        trial.set_user_attr("log", str(log_path))
        tail, env = MetricsTail(run_dir / METRICS), {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=lease.env(env) if lease else env,
                pass_fds=tuple(lease.fds) if lease else (),
                preexec_fn=_die_with_parent,
            )
            try:
                while True:
                    rc = proc.poll()
                    for record in tail.read_new(final=rc is not None):
                        self.on_record(trial, record)
                    if rc is not None:
                        break
                    time.sleep(0.5)
            except BaseException:
                _terminate(proc)
                raise
        if rc != 0:
            raise SolutionError(f"trainer exited with code {rc}: {_last_error(log_path)}")


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM it when the search dies
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux only)


def _terminate(proc: subprocess.Popen, grace: float = 30.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _last_error(log_path: Path) -> str:
    """The child's most telling log line: the last error (or out of memory) line, else the last line."""
    lines = [ln.strip() for ln in log_path.read_text("utf-8", "replace")[-8192:].splitlines() if ln.strip()]
    telling = [
        ln for ln in lines if "out of memory" in ln.lower() or ln.startswith("error:") or "Error" in ln.split(":")[0]
    ]
    return (telling or lines or ["(empty log)"])[-1][:300]


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler preempting the job) ends the running trial as Ctrl-C does, for the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
