"""A search study: created or resumed from its storage, run until ``n_trials`` trials are counted, then
waiting for the trials other workers still run (re-running one whose worker died); its reports are
rewritten after every trial and at the end.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from solution.common import SolutionError, check_output
from solution.formats.trials import NAME as TRIALS_CSV

from .gpus import gpu_pool
from .report import write_reports
from .runner import Objective, sigterm_as_interrupt
from .search_config import SearchConfig, check_trial_flags, flag_key
from .storage import (
    DIED,
    FINISHED,
    counted_trials,
    fail_dead_trials,
    heartbeat_enabled,
    make_storage,
    running_trials,
    safe_url,
    storage_url,
)

log = logging.getLogger(__name__)


def _make(kind: str, spec: dict):
    """``{"name": ..., **kwargs}`` -> an Optuna pruner (median | hyperband | none) or sampler (tpe | random;
    TPE with ``constant_liar``, so that parallel workers spread)."""
    kw = {k: v for k, v in spec.items() if k != "name"}
    make = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": lambda **kw: optuna.pruners.NopPruner(),
        "random": optuna.samplers.RandomSampler,
        "tpe": lambda **kw: optuna.samplers.TPESampler(**{"constant_liar": True, **kw}),
    }[spec["name"]]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return make(**kw)
    except TypeError as e:
        raise SolutionError(f"{kind} {spec['name']}: {e}") from None


def open_study(cfg: SearchConfig) -> optuna.Study:
    """Create or load the study in its storage; fail dead workers' trials; queue ``enqueue`` once."""
    if not cfg.out:
        log.info("%s gives no out: the study folder is %s", cfg.source, cfg.study_dir)
    check_output(cfg.study_dir, what="study folder", is_dir=True)
    storage = make_storage(cfg)
    cfg.study_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=cfg.name,
        storage=storage,
        sampler=_make("sampler", cfg.sampler),
        pruner=_make("pruner", cfg.pruner),
        direction=cfg.direction,
        load_if_exists=True,
    )
    fail_dead_trials(study, cfg.retry_interrupted)
    for params in cfg.enqueue:  # skipped when a trial with these values exists or waits already
        study.enqueue_trial({flag_key(k): v for k, v in params.items()}, skip_if_exists=True)
    return study


def run_search(cfg: SearchConfig, train_main: Callable | None = None) -> dict:
    """Create or resume the study, run trials until ``n_trials`` are counted, write the reports."""
    if train_main is None and cfg.launcher is None:
        check_trial_flags(cfg)  # a config that cannot start one trial is refused before the first
    pool = gpu_pool(cfg)  # before the study: a worker without the GPUs it needs is refused first
    study = open_study(cfg)
    objective, url = Objective(cfg, train_main, pool), safe_url(storage_url(cfg))
    log.info(
        "study %r in %s (storage %s): %d of %d trials counted",
        cfg.name,
        cfg.study_dir,
        url,
        counted_trials(study),
        cfg.n_trials,
    )
    t0, waiting = time.time(), False
    try:
        while cfg.timeout is None or time.time() - t0 < cfg.timeout:
            if counted_trials(study) < cfg.n_trials:
                try:  # Optuna fails the trials of dead workers first, by heartbeat
                    study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
                except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
                    if isinstance(e, ValueError) and "Cannot tell a" not in str(e):
                        raise
                    log.warning("another worker failed this trial for want of heartbeat (overloaded machine?): %s", e)
                write_reports(study, cfg, plots=cfg.plots == "each")
                continue
            running = running_trials(study)  # budget met: wait for the others, re-run a dead worker's trial
            if not running or not heartbeat_enabled(study):
                break
            if not waiting:
                numbers = ", ".join(str(t.number) for t in running)
                log.info("budget counted; waiting for trial(s) %s of other workers (or re-running them)", numbers)
            waiting = True
            time.sleep(min(cfg.heartbeat, 5))
            fail_dead_trials(study, cfg.retry_interrupted)
        else:
            log.info("timeout of %.0f s reached", cfg.timeout)
    finally:
        write_reports(study, cfg, plots=bool(cfg.plots))
    return summarize(study, cfg)


def summarize(study: optuna.Study, cfg: SearchConfig) -> dict:
    """Counts by state; the best trial, or the first failure when none completed."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    summary = {
        "study": cfg.name,
        "study_dir": str(cfg.study_dir),
        "n_trials": len(states),
        **{s.name.lower(): states.count(s) for s in TrialState if s in FINISHED or s in states},
    }
    if TrialState.COMPLETE in states:
        summary.update(
            best_value=study.best_value, best_trial=study.best_trial.number, best_params=study.best_trial.params
        )
    else:
        failed = [t for t in trials if t.state == TrialState.FAIL]
        summary["first_failure"] = (
            f"trial {failed[0].number}: {failed[0].user_attrs.get('fail_reason', DIED)}" if failed else None
        )
    return summary


def search(cfg: SearchConfig, stream=None) -> dict:
    """:func:`run_search` for the command line: the summary as one JSON line on ``stream`` (when given);
    SIGTERM or Ctrl-C is exit code 130 (the running trial is re-queued); a study that completed no
    trial is a :class:`SolutionError` (after the summary)."""
    try:
        with sigterm_as_interrupt():
            summary = run_search(cfg)
    except KeyboardInterrupt:
        log.warning(
            "interrupted: the running trial is recorded FAIL (interrupted) and re-queued; "
            "re-run the same command to resume the study"
        )
        raise SystemExit(130) from None
    if stream is not None:
        stream.write(json.dumps(summary, ensure_ascii=False) + "\n")
        stream.flush()
    if cfg.n_trials and not summary.get("complete"):
        first = f"; first failure: {summary['first_failure']}" if summary["first_failure"] else ""
        raise SolutionError(
            f"study {cfg.name!r} completed no trial ({summary.get('fail', 0)} failed, "
            f"{summary.get('pruned', 0)} pruned{first}); see {cfg.study_dir / TRIALS_CSV}"
        )
    return summary
