"""A search study: created or resumed, run until ``n_trials`` trials are counted, then waiting for the trials other
workers still run (re-running one whose worker died); its folder's reports (``trials.csv``, ``best_command.sh``,
``best_config.yaml``, Optuna's plots) rewritten atomically after every trial and at the end."""

from __future__ import annotations

import json
import logging
import shlex
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

from solution.common import SolutionError, atomic_path, check_output
from solution.formats.kinds import SIGNATURES, claim_folder, folder_kind
from solution.formats.trials import NAME as TRIALS_CSV
from solution.formats.trials import write_trials
from solution.plots import save_png

from . import storage
from .gpus import gpu_pool
from .runner import Objective, sigterm_as_interrupt
from .search_config import SearchConfig, check_trial_flags, flag_key, flags_to_argv, trial_flags

log = logging.getLogger(__name__)

TRIAL_ATTRS = ("number", "state", "value", "params", "user_attrs", "datetime_start", "duration")
USER_ATTRS = ("run_dir", "best_checkpoint", "fail_reason", "pruned_at", "retry_of", "gpus")
MAKERS = {  # a pruner or sampler by name; TPE with constant_liar, so that parallel workers spread
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": lambda **kw: optuna.pruners.NopPruner(**kw),
    "random": optuna.samplers.RandomSampler,
    "tpe": lambda **kw: optuna.samplers.TPESampler(**{"constant_liar": True, **kw}),
}


def _make(kind: str, spec: dict):  # {"name": ..., **kwargs} -> the Optuna pruner or sampler
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return MAKERS[spec["name"]](**{k: v for k, v in spec.items() if k != "name"})
    except (TypeError, ValueError) as e:
        raise SolutionError(f"{kind} {spec['name']}: {e}") from None


def open_study(cfg: SearchConfig) -> optuna.Study:
    """Claim the study folder, create or load the study in its storage, queue ``enqueue`` once."""
    if not cfg.out:
        log.info("%s gives no out: the study folder is %s", cfg.source, cfg.study_dir)
    check_output(cfg.study_dir, what="study folder", is_dir=True)
    inside = next((p for p in cfg.study_dir.absolute().parents if folder_kind(p) in SIGNATURES), None)
    if inside is not None:
        raise SolutionError(f"study folder {cfg.study_dir} lies inside {inside}, a {folder_kind(inside)} folder")
    given = cfg.storage and storage.make_storage(cfg)  # a bad URL is refused before the folder is made
    claim_folder(cfg.study_dir, "study", "study folder")  # no lock: the workers of a study claim it together
    study = optuna.create_study(
        study_name=cfg.name,
        storage=given or storage.make_storage(cfg),
        sampler=_make("sampler", cfg.sampler),
        pruner=_make("pruner", cfg.pruner),
        direction=cfg.direction,
        load_if_exists=True,
    )
    for params in cfg.enqueue:  # skipped when a trial with these values exists or waits already
        study.enqueue_trial({flag_key(k): v for k, v in params.items()}, skip_if_exists=True)
    return study


def run_search(cfg: SearchConfig, train_main: Callable | None = None) -> dict:
    """Create or resume the study, run trials until ``n_trials`` are counted, write the reports."""
    if train_main is None and cfg.launcher is None:
        check_trial_flags(cfg)  # a config that cannot start one trial is refused before the first
    pool = gpu_pool(cfg)  # before the study: a worker without the GPUs it needs is refused first
    study, objective, url = open_study(cfg), Objective(cfg, train_main, pool), storage.storage_url(cfg)
    beats = cfg.heartbeat and not url.startswith("journal:")  # a dead worker elsewhere is seen: wait for its trials
    counted, where = storage.counted_trials(study), f"{cfg.study_dir} (storage {storage.safe_url(url)})"
    log.info("study %r in %s: %d of %d trials counted", cfg.name, where, counted, cfg.n_trials)
    t0, waiting = time.time(), False
    try:
        while cfg.timeout is None or time.time() - t0 < cfg.timeout:
            storage.fail_dead_trials(study)
            if storage.counted_trials(study) < cfg.n_trials:
                try:
                    study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
                except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
                    if isinstance(e, ValueError) and "Cannot tell a" not in str(e):
                        raise
                    log.warning("another worker failed this trial for want of heartbeat (overloaded machine?): %s", e)
                write_reports(study, cfg, plots=cfg.plots == "each")
                continue
            running = storage.running_trials(study)  # budget met: wait for the others, re-run a dead worker's trial
            if not running or not beats:
                break
            if not waiting:
                numbers = ", ".join(str(t.number) for t in running)
                log.info("budget counted; waiting for trial(s) %s of other workers (or re-running them)", numbers)
            waiting = True
            time.sleep(min(cfg.heartbeat, 5))
        else:
            log.info("timeout of %.0f s reached", cfg.timeout)
    finally:
        write_reports(study, cfg, plots=bool(cfg.plots))
    return summarize(study, cfg)


def summarize(study: optuna.Study, cfg: SearchConfig) -> dict:
    """Counts by state; the best trial, or the first failure when none completed."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    counts = {s.name.lower(): states.count(s) for s in TrialState if s in storage.FINISHED or s in states}
    summary = {"study": cfg.name, "study_dir": str(cfg.study_dir), "n_trials": len(states), **counts}
    if TrialState.COMPLETE in states:
        best = study.best_trial
        return {**summary, "best_value": best.value, "best_trial": best.number, "best_params": best.params}
    failed = next((t for t in trials if t.state == TrialState.FAIL), None)
    why = failed and f"trial {failed.number}: {failed.user_attrs.get('fail_reason', storage.DIED)}"
    return {**summary, "first_failure": why}


def search(cfg: SearchConfig, stream) -> dict:
    """:func:`run_search` for the command line: the summary a JSON line; SIGTERM or Ctrl-C is exit code 130."""
    try:
        with sigterm_as_interrupt():
            summary = run_search(cfg)
    except KeyboardInterrupt:
        log.warning("interrupted: the running trial is re-queued; re-run the same command to resume the study")
        raise SystemExit(130) from None
    stream.write(json.dumps(summary, ensure_ascii=False) + "\n")
    stream.flush()
    if cfg.n_trials and not summary.get("complete"):
        first = f"; first failure: {summary['first_failure']}" if summary["first_failure"] else ""
        raise SolutionError(
            f"study {cfg.name!r} completed no trial ({summary.get('fail', 0)} failed, "
            f"{summary.get('pruned', 0)} pruned{first}); see {cfg.study_dir / TRIALS_CSV}"
        )
    return summary


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """number, state, value, run_dir, params_*, then timing and reasons."""
    df = study.trials_dataframe(attrs=TRIAL_ATTRS)
    if df.empty:
        return pd.DataFrame(columns=["number", "state", "value", "run_dir"])
    df = df.rename(columns={f"user_attrs_{k}": k for k in USER_ATTRS})
    df = df.drop(columns=[c for c in df.columns if c.startswith("user_attrs_")])
    df = df.assign(**{k: None for k in ("run_dir", "fail_reason") if k not in df})
    died = (df["state"] == "FAIL") & df["fail_reason"].isna()  # failed by another worker: no heartbeat
    df["fail_reason"] = df["fail_reason"].astype(object).where(~died, storage.DIED)
    head = ["number", "state", "value", "run_dir", *sorted(c for c in df.columns if c.startswith("params_"))]
    return df[head + [c for c in df.columns if c not in head]]


def write_reports(study: optuna.Study, cfg: SearchConfig, plots: bool = True) -> None:
    out = cfg.study_dir
    write_trials(out / TRIALS_CSV, trials_table(study))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        flags = {**trial_flags(cfg, best.params), "logs": cfg.base.get("logs") or "logs", "name": f"{cfg.name}-best"}
        header = f"# best trial {best.number} of study {cfg.name!r}: mean_recall = {best.value:.4f}\n"
        header += f"# params: {json.dumps(best.params, ensure_ascii=False)}\n"
        lines = [shlex.join(a) for a in (flags_to_argv({k: v}) for k, v in flags.items()) if a]  # a flag a line
        with atomic_path(out / "best_command.sh") as tmp:
            command = " \\\n  ".join(["bash Chinese-CLIP/train_clip.sh", *lines])
            tmp.write_text(f"#!/usr/bin/env bash\n{header}set -euo pipefail\n{command}\n", encoding="utf-8")
            tmp.chmod(0o755)
        config = yaml.safe_dump({k: v for k, v in flags.items() if v is not None}, allow_unicode=True, sort_keys=False)
        with atomic_path(out / "best_config.yaml") as tmp:
            use = "# use: bash Chinese-CLIP/train_clip.sh --config best_config.yaml\n"
            tmp.write_text(header + use + config, encoding="utf-8")
    if plots:
        write_plots(study, out, len(complete))


def write_plots(study: optuna.Study, out: Path, n_complete: int) -> None:
    """Optuna's history, intermediate values, parallel coordinates and importances, where they apply."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    trials = study.get_trials(deepcopy=False)
    plots = {"history": ovm.plot_optimization_history}
    if any(t.intermediate_values for t in trials):
        plots["intermediate"] = ovm.plot_intermediate_values
    if n_complete and study.best_trial.params:
        plots["parallel_coordinate"] = ovm.plot_parallel_coordinate
    if len({t.value for t in trials if t.state == TrialState.COMPLETE}) > 1:
        plots["param_importances"] = ovm.plot_param_importances
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API notes; CJK prompt glyphs missing from the font
                ax = fn(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                save_png(fig, out / f"{name}.png", dpi=110, bbox_inches="tight")
        except Exception as e:  # a plot is never worth failing the study
            log.warning("plot %s skipped: %s", name, e)
        finally:
            plt.close("all")
