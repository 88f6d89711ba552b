"""A search study folder's outputs, each written atomically after every trial: ``trials.csv``,
``best_command.sh``, ``best_config.yaml``, ``best.json`` and Optuna's matplotlib plots as PNGs.
"""

from __future__ import annotations

import json
import logging
import shlex
import warnings
from pathlib import Path

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

from solution.common import atomic_path, write_json
from solution.formats.trials import NAME as TRIALS_CSV
from solution.formats.trials import write_trials

from .search_config import SearchConfig, flags_to_argv, trial_flags
from .storage import DIED

log = logging.getLogger(__name__)

USER_ATTRS = ("run_dir", "best_checkpoint", "fail_reason", "pruned_at", "retry_of", "gpus")


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """number, state, value, run_dir, params_*, then timing and reasons."""
    df = study.trials_dataframe(
        attrs=("number", "state", "value", "params", "user_attrs", "datetime_start", "duration")
    )
    if df.empty:
        return pd.DataFrame(columns=["number", "state", "value", "run_dir"])
    df = df.rename(columns={f"user_attrs_{k}": k for k in USER_ATTRS})
    df = df.drop(columns=[c for c in df.columns if c.startswith("user_attrs_")])
    df = df.assign(**{k: None for k in ("run_dir", "fail_reason") if k not in df})
    died = (df["state"] == "FAIL") & df["fail_reason"].isna()  # failed by another worker: no heartbeat
    df["fail_reason"] = df["fail_reason"].astype(object).where(~died, DIED)
    head = ["number", "state", "value", "run_dir", *sorted(c for c in df.columns if c.startswith("params_"))]
    return df[head + [c for c in df.columns if c not in head]]


def write_reports(study: optuna.Study, cfg: SearchConfig, plots: bool = True) -> None:
    out = cfg.study_dir
    write_trials(out / TRIALS_CSV, trials_table(study))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        flags = {**trial_flags(cfg, best.params), "logs": cfg.base.get("logs") or "logs", "name": f"{cfg.name}-best"}
        header = (
            f"# best trial {best.number} of study {cfg.name!r}: {cfg.metric} = {best.value:.4f}\n"
            f"# params: {json.dumps(best.params, ensure_ascii=False)}\n"
        )
        lines: list[str] = []  # a flag and its values on one line
        for a in map(shlex.quote, flags_to_argv(flags)):
            if a.startswith("--") or not lines:
                lines.append(a)
            else:
                lines[-1] += " " + a
        command = " \\\n  ".join(["bash Chinese-CLIP/train_clip.sh", *lines])
        with atomic_path(out / "best_command.sh") as tmp:
            tmp.write_text(f"#!/usr/bin/env bash\n{header}set -euo pipefail\n{command}\n", encoding="utf-8")
            tmp.chmod(0o755)
        config = yaml.safe_dump({k: v for k, v in flags.items() if v is not None}, allow_unicode=True, sort_keys=False)
        with atomic_path(out / "best_config.yaml") as tmp:
            use = "# use: bash Chinese-CLIP/train_clip.sh --config best_config.yaml\n"
            tmp.write_text(header + use + config, encoding="utf-8")
        record = {"number": best.number, "value": best.value, "metric": cfg.metric, "direction": cfg.direction}
        attrs = {k: best.user_attrs.get(k) for k in ("run_dir", "best_checkpoint")}
        write_json(out / "best.json", {**record, "params": best.params, **attrs})
    if plots:
        write_plots(study, out, len(complete))


def write_plots(study: optuna.Study, out: Path, n_complete: int) -> list[Path]:
    """Optuna's history, intermediate values, parallel coordinates and importances, where they apply;
    a plot that fails is a warning."""
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
    written = []
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API notes; CJK prompt glyphs missing from the font
                ax = fn(study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                with atomic_path(out / f"{name}.png") as tmp:
                    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            written.append(out / f"{name}.png")
        except Exception as e:  # a plot is never worth failing the study
            log.warning("plot %s skipped: %s", name, e)
        finally:
            plt.close("all")
    return written
