"""Optuna hyperparameter search over fine-tuning runs, pruned on validation recall.

``bash scripts/search.sh --config configs/search/demo-cpu.yaml`` (= ``python -m solution.search``).

Each trial is one ordinary training run (``solution.train``) whose run directory is kept under
``{out}/{study}/trials/{number:04d}/``, so the trials are ready soup ingredients
(``model_soup.sh --from-study DIR --top N`` takes the best N). Every validation of the main set
reports its mean recall to Optuna; the pruner (median by default, Hyperband or none) stops hopeless
trials. A pruned trial is recorded PRUNED, a failed one (exception, bad flag, NaN loss, out of
memory, crashed child) FAIL with ``fail_reason`` in its user attrs, and the study goes on.

Config (YAML)::

    name: demo                 # study name (--study-name)
    direction: maximize
    n_trials: 6                # target count of finished trials (complete + pruned + failed)
    out: runs/search           # study folder = {out}/{name}/ (the default when out: is missing)
    storage: null              # default sqlite:///{out}/{name}/study.db; any Optuna RDB URL;
                               # journal:PATH for a journal file (many workers, NFS)
    heartbeat: 60              # RDB storages: a running trial beats every N s (0: off); one silent for
    grace_period: null         # grace_period s (default 3 x heartbeat) is failed and re-run elsewhere
    pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 0}   # or hyperband / none
    sampler: {name: tpe, seed: null, n_startup_trials: 4}            # or random
    mode: inprocess            # or subprocess (a clean child per trial; torchrun_nproc: N)
    report_at: step            # x axis for the pruner: step | epoch (when batch size varies; then
                               # validate per epoch only: a second validation in an epoch is not reported)
    enqueue: [{lr: 1.0e-4}]    # trials to run first (e.g. the default settings); skipped once present
    plots: each                # each (after every trial) | end | false
    base:                      # any train_clip.sh flag, named without dashes
      train-data: DIR/lmdb/train
      resume: base.pt          # every trial fine-tunes from the same start (soups need that)
      freeze-vision: false     # true -> --freeze-vision, false/null -> flag omitted
    space:
      lr: {type: float, low: 1.0e-6, high: 1.0e-4, log: true}
      batch-size: {type: int, low: 16, high: 128, step: 16}
      text-prompt: {type: categorical, choices: [null, "这是一张图片，里面存在商品："]}
      lora-alpha: {type: int, low: 8, high: 64, only_if: lora-rank}    # sampled only when rank > 0
      tuning: {type: categorical, choices: [full, frozen-image],        # a choice that sets flags
               sets: {frozen-image: {freeze-vision: true}}}

``--set FLAG=VALUE`` overrides a base flag from the command line (``--set resume=`` drops it).
A flag the trainer does not know, or a value its parser refuses, stops the search before the first
trial; a search in which no trial completes exits with an error.
The value of a trial is its best validation mean recall; ``best.pt`` of its run is that model.

Storage and workers: re-running the same command resumes the study (``load_if_exists``) and runs
only the trials still missing from ``n_trials``. Several workers (processes or machines) share one
study by pointing at the same storage: SQLite on one machine, PostgreSQL/MySQL or
``journal:/shared/study.log`` across machines. A trial whose worker died (``kill -9``) is marked
FAIL, not counted, and its parameters re-queued once (solution.search_storage): by heartbeat on an
RDB, after the grace period, from any machine; by process check on this host for a journal. A
worker that reaches ``n_trials`` waits for the running trials of the others before it exits.

Outputs in ``{out}/{name}/`` (rewritten after every trial, so a kill leaves them current):
``trials.csv`` (number, state, value, run_dir, params_*, ...), ``best_command.sh`` (a ready
``bash Chinese-CLIP/train_clip.sh ...``), ``best_config.yaml``, ``best.json`` and PNG plots
(history, intermediate values, parameter importances, parallel coordinates). Browse a study
live with ``pip install optuna-dashboard && optuna-dashboard sqlite:///runs/search/demo-cpu/study.db``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import optuna
import yaml
from optuna.trial import TrialState

from solution.common import SolutionError, atomic_path, check_output, run_cli
from .config import (SearchConfig, check_config, check_trial_flags, flag_key, flags_to_argv, load_config,
                            parse_config, suggest_params, trial_flags)
from .report import trials_table, write_plots, write_reports
from .storage import (DIED, FINISHED, counted_trials, fail_dead_trials, grace_period, heartbeat_enabled,
                             make_storage, requeue, running_trials, safe_url, storage_url, worker_info)

log = logging.getLogger(__name__)

__all__ = ["SearchConfig", "load_config", "parse_config", "run_search", "trials_table", "write_plots", "write_reports",
           "main"]


class TrialFailed(Exception):
    """A trial that failed for a known reason (bad flag, child crash, no validation)."""


# ---------------------------------------------------------------- study


def make_pruner(spec: dict):
    kw = {k: v for k, v in spec.items() if k != "name"}
    try:
        if spec["name"] == "median":
            return optuna.pruners.MedianPruner(**kw)
        if spec["name"] == "hyperband":
            return optuna.pruners.HyperbandPruner(**kw)
    except TypeError as e:
        raise SolutionError(f"pruner {spec['name']}: {e}") from None
    return optuna.pruners.NopPruner()


def make_sampler(spec: dict):
    kw = {k: v for k, v in spec.items() if k != "name"}
    try:
        if spec["name"] == "random":
            return optuna.samplers.RandomSampler(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(**{"constant_liar": True, **kw})  # liar: parallel workers spread
    except TypeError as e:
        raise SolutionError(f"sampler {spec['name']}: {e}") from None


# ---------------------------------------------------------------- running one trial


class Objective:
    """Runs one training per trial, reports each validation, prunes, returns the best metric."""

    def __init__(self, cfg: SearchConfig, train_main: Callable | None = None):
        self.cfg, self.train_main = cfg, train_main
        self.trials_dir = cfg.study_dir / "trials"

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = self.cfg
        run_dir = self.trials_dir / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", worker_info())  # one write: a dead worker's trials are recognised
        self.values: list[float] = []
        self.reported: set[int] = set()
        try:  # every failure in a live worker records fail_reason (a FAIL without one is a dead worker's)
            params = suggest_params(trial, cfg.space)
            flags = {**trial_flags(cfg, params), "logs": str(self.trials_dir), "name": run_dir.name}
            argv = flags_to_argv(flags)
            _move_stale(run_dir)
            trial.set_user_attr("argv", argv)
            log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in params.items()) or "(no params)")
            if cfg.mode == "inprocess":
                self._run_inprocess(trial, argv)
            else:
                self._run_subprocess(trial, argv, flags, run_dir)
            if not self.values:
                raise TrialFailed(f"the run reported no validation of set {cfg.valid_set!r} "
                                  f"(give --val-data and a validation interval)")
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: not the trial's fault, so not counted and re-queued
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C / SIGTERM)")
            if cfg.retry_interrupted:
                requeue(trial.study, trial.number, trial.params, trial.user_attrs)
            raise
        except SystemExit as e:  # argparse inside the trainer: a bad flag in the config
            reason = f"trainer exited with code {e.code} (bad flag value?)"
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason) from None
        except BaseException as e:
            trial.set_user_attr("fail_reason", _describe(e))
            raise
        best = max(self.values) if cfg.direction == "maximize" else min(self.values)
        best_ckpt = run_dir / "checkpoints" / "best.pt"
        if best_ckpt.is_file():
            trial.set_user_attr("best_checkpoint", str(best_ckpt))
        return best

    def on_record(self, trial: optuna.Trial, record: dict) -> None:
        """One metrics.jsonl record: report a main-set validation and prune if asked."""
        if record.get("kind") != "valid" or record.get("set", "valid") != self.cfg.valid_set:
            return
        value, step = record.get(self.cfg.metric), record.get(self.cfg.report_at)
        if value is None or step is None:
            return
        value, step = float(value), int(step)
        if not math.isfinite(value):
            raise TrialFailed(f"validation {self.cfg.metric} is {value} at {self.cfg.report_at} {step}")
        self.values.append(value)
        if step in self.reported:
            return
        self.reported.add(step)
        trial.report(value, step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at", step)
            raise optuna.TrialPruned(f"{self.cfg.metric}={value:.2f} at {self.cfg.report_at} {step}")

    def _run_inprocess(self, trial: optuna.Trial, argv: list[str]) -> None:
        train_main = self.train_main
        if train_main is None:
            from solution.training.trainer import main as train_main
        try:
            train_main(argv, on_validation=lambda record: self.on_record(trial, record))
        finally:
            gc.collect()
            _empty_cuda_cache()

    def _run_subprocess(self, trial: optuna.Trial, argv: list[str], flags: dict, run_dir: Path) -> None:
        cfg = self.cfg
        if cfg.launcher:
            cmd = [*map(str, cfg.launcher), *argv]
        elif cfg.torchrun_nproc > 0:
            # torchrun's own parser would take trainer flags such as --logs for its --logs-specs:
            # the trial's flags go through the trainer's --config file instead
            config = self.trials_dir / f"{run_dir.name}.yaml"
            with atomic_path(config) as tmp:
                tmp.write_text(yaml.safe_dump({k: v for k, v in flags.items() if v is not None and v is not False},
                                              allow_unicode=True, sort_keys=False), encoding="utf-8")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={cfg.torchrun_nproc}", "-m", "solution.train", "--config", str(config)]
        else:
            cmd = [sys.executable, "-m", "solution.train", *argv]
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.trials_dir / f"{run_dir.name}.log"
        trial.set_user_attr("log", str(log_path))
        tail = MetricsTail(run_dir / "metrics.jsonl")
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent)
            try:
                while True:
                    rc = proc.poll()
                    for record in tail.read_new():
                        self.on_record(trial, record)
                    if rc is not None:
                        break
                    time.sleep(0.5)
            except BaseException:
                _terminate(proc)
                raise
        if rc != 0:
            raise TrialFailed(f"trainer exited with code {rc}: {_last_error(log_path)}")


def _move_stale(run_dir: Path) -> None:
    """A trial's directory must start empty: the trainer would resume from a stale epoch_latest.pt
    left by an earlier study of the same name (deleted storage, other storage, same --out)."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        log.warning("%s exists from an earlier study: moved to %s", run_dir, aside.name)
        run_dir.rename(aside)


class MetricsTail:
    """Reads the complete lines appended to a metrics.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        records = []
        for line in chunk[:end].splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: skipping a malformed line", self.path)
        return records


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM it when the search dies
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux only)
    except Exception:
        pass


def _terminate(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_error(log_path: Path) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    for line in reversed(lines):
        if "out of memory" in line.lower():
            return f"out of memory: {line[:300]}"
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line.split(":")[0]:
            return line[:300]
    return lines[-1][:300] if lines else "(empty log)"


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    if "out of memory" in text.lower():
        return f"out of memory: {text}"[:500]
    return text[:500]


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# ---------------------------------------------------------------- driver


def run_search(cfg: SearchConfig, train_main: Callable | None = None) -> dict:
    """Create or resume the study, run trials until ``n_trials`` are counted, write the reports."""
    if train_main is None and cfg.launcher is None:
        check_trial_flags(cfg)  # a config that cannot start one trial is refused before the first
    if not cfg.out:
        log.info("%s gives no out: the study folder is %s", cfg.source, cfg.study_dir)
    check_output(cfg.study_dir, what="study folder", is_dir=True)
    storage = make_storage(cfg)
    cfg.study_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=cfg.name, storage=storage, sampler=make_sampler(cfg.sampler),
                                pruner=make_pruner(cfg.pruner), direction=cfg.direction, load_if_exists=True)
    fail_dead_trials(study, cfg.retry_interrupted)
    if cfg.enqueue:
        for params in cfg.enqueue:  # skipped when a trial with these values exists or waits already
            study.enqueue_trial({flag_key(k): v for k, v in params.items()}, skip_if_exists=True)
    objective = Objective(cfg, train_main)
    log.info("study %r in %s (storage %s): %d of %d trials already counted", cfg.name, cfg.study_dir,
             safe_url(storage_url(cfg)), counted_trials(study), cfg.n_trials)
    t0, waiting = time.time(), False
    try:
        while True:
            if cfg.timeout is not None and time.time() - t0 >= cfg.timeout:
                log.info("timeout of %.0f s reached", cfg.timeout)
                break
            if counted_trials(study) < cfg.n_trials:
                try:  # (Optuna fails the trials of dead workers first, by heartbeat)
                    study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
                except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
                    if isinstance(e, ValueError) and "Cannot tell a" not in str(e):
                        raise
                    log.warning("another worker failed this worker's trial for want of heartbeat (grace period "
                                "%d s; is this machine overloaded?): %s", grace_period(cfg), e)
                write_reports(study, cfg, plots=cfg.plots == "each")
                continue
            running = running_trials(study)  # budget met: wait for the others, re-run a dead worker's trial
            if not running or not heartbeat_enabled(study):
                break
            if not waiting:
                log.info("%d trials counted; waiting for trial(s) %s of other workers (one whose worker died is "
                         "failed after %d s without heartbeat and re-run here)", counted_trials(study),
                         ", ".join(str(t.number) for t in running), grace_period(cfg))
            waiting = True
            time.sleep(min(cfg.heartbeat, 5))
            fail_dead_trials(study, cfg.retry_interrupted)
    finally:
        write_reports(study, cfg, plots=bool(cfg.plots))
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    summary = {"study": cfg.name, "study_dir": str(cfg.study_dir), "n_trials": len(states),
               **{s.name.lower(): states.count(s) for s in TrialState if s in FINISHED or s in states}}
    if TrialState.COMPLETE in states:
        summary.update(best_value=study.best_value, best_trial=study.best_trial.number,
                       best_params=study.best_trial.params)
    else:
        failed = [t for t in trials if t.state == TrialState.FAIL]
        summary["first_failure"] = (f"trial {failed[0].number}: {failed[0].user_attrs.get('fail_reason', DIED)}"
                                    if failed else None)
    return summary


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler preempting the job) ends the running trial cleanly, as Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m solution.search", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 3)[3], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="search config YAML (see configs/search/)")
    p.add_argument("--n-trials", type=int, help="target number of finished trials (overrides the config)")
    p.add_argument("--storage", help="Optuna storage URL or journal:PATH (default sqlite in the study folder)")
    p.add_argument("--study-name", help="study name (default: the config's name)")
    p.add_argument("--out", help="folder holding the study folder (default: the config's out, else runs/search)")
    p.add_argument("--mode", choices=["inprocess", "subprocess"])
    p.add_argument("--torchrun-nproc", type=int, help="subprocess mode: launch each trial with torchrun on N procs")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"])
    p.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    p.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                   help="override a base training flag (repeatable), e.g. --set device=cpu; FLAG= drops it")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    for key in ("n_trials", "storage", "out", "mode", "torchrun_nproc", "timeout"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.study_name:
        cfg.name = args.study_name
    if args.torchrun_nproc:
        cfg.mode = "subprocess"
    if args.pruner and args.pruner != cfg.pruner["name"]:
        cfg.pruner = {"name": args.pruner}
    if args.no_plots:
        cfg.plots = False
    check_config(cfg, args.config)
    try:
        with _sigterm_as_interrupt():
            summary = run_search(cfg)
    except KeyboardInterrupt:
        log.warning("interrupted: the running trial is recorded FAIL (interrupted) and re-queued; "
                    "re-run the same command to resume the study")
        raise SystemExit(130) from None
    print(json.dumps(summary, ensure_ascii=False))
    if cfg.n_trials and not summary.get("complete"):
        first = f"; first failure: {summary['first_failure']}" if summary["first_failure"] else ""
        raise SolutionError(f"study {cfg.name!r} completed no trial ({summary.get('fail', 0)} failed, "
                            f"{summary.get('pruned', 0)} pruned{first}); see {cfg.study_dir / 'trials.csv'}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
