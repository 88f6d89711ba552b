"""Outputs of a search study folder, rewritten after every trial: ``trials.csv`` (through
:func:`solution.formats.trials.write_trials`), ``best_command.sh``, ``best_config.yaml``, ``best.json``
and Optuna's matplotlib plots as PNGs.
"""

from __future__ import annotations

import json
import logging
import shlex
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from solution.common import atomic_path, write_json
from solution.formats.trials import NAME as TRIALS_CSV
from solution.formats.trials import write_trials

from .search_config import SearchConfig, flags_to_argv, trial_flags
from .storage import DIED

log = logging.getLogger(__name__)


def trials_table(study: optuna.Study):
    """Pandas table: number, state, value, run_dir, params_*, then timing and reasons."""
    import pandas as pd

    df = study.trials_dataframe(
        attrs=("number", "state", "value", "params", "user_attrs", "datetime_start", "duration")
    )
    if df.empty:
        return pd.DataFrame(columns=["number", "state", "value", "run_dir"])
    kept = ("run_dir", "best_checkpoint", "fail_reason", "pruned_at", "retry_of", "gpus")
    rename = {f"user_attrs_{k}": k for k in kept}
    df = df.rename(columns=rename)
    df = df.drop(columns=[c for c in df.columns if c.startswith("user_attrs_")])
    if "run_dir" not in df:
        df["run_dir"] = None
    if "fail_reason" not in df:
        df["fail_reason"] = None
    died = (df["state"] == "FAIL") & df["fail_reason"].isna()  # failed by another worker: no heartbeat
    df["fail_reason"] = df["fail_reason"].astype(object).where(~died, DIED)
    params = sorted(c for c in df.columns if c.startswith("params_"))
    head = ["number", "state", "value", "run_dir", *params]
    return df[head + [c for c in df.columns if c not in head]]


def write_reports(study: optuna.Study, cfg: SearchConfig, plots: bool = True) -> None:
    """Every output of the study folder, each written atomically."""
    out = cfg.study_dir
    write_trials(out / TRIALS_CSV, trials_table(study))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        flags = trial_flags(cfg, best.params)
        flags["logs"] = cfg.base.get("logs") or "logs"
        flags["name"] = f"{cfg.name}-best"
        header = (
            f"best trial {best.number} of study {cfg.name!r}: {cfg.metric} = {best.value:.4f}\n"
            f"params: {json.dumps(best.params, ensure_ascii=False)}"
        )
        command = " \\\n  ".join(["bash Chinese-CLIP/train_clip.sh"] + _argv_lines(flags_to_argv(flags)))
        with atomic_path(out / "best_command.sh") as tmp:
            tmp.write_text(
                "#!/usr/bin/env bash\n"
                + "".join(f"# {ln}\n" for ln in header.splitlines())
                + "set -euo pipefail\n"
                + command
                + "\n",
                encoding="utf-8",
            )
            tmp.chmod(0o755)
        with atomic_path(out / "best_config.yaml") as tmp:
            tmp.write_text(
                "".join(f"# {ln}\n" for ln in header.splitlines())
                + "# use: bash Chinese-CLIP/train_clip.sh --config best_config.yaml\n"
                + yaml.safe_dump(
                    {k: v for k, v in flags.items() if v is not None}, allow_unicode=True, sort_keys=False
                ),
                encoding="utf-8",
            )
        write_json(
            out / "best.json",
            {
                "number": best.number,
                "value": best.value,
                "metric": cfg.metric,
                "direction": cfg.direction,
                "params": best.params,
                "run_dir": best.user_attrs.get("run_dir"),
                "best_checkpoint": best.user_attrs.get("best_checkpoint"),
            },
        )
    if plots:
        write_plots(study, out, len(complete))


def _argv_lines(argv: list[str]) -> list[str]:
    lines: list[str] = []
    for a in argv:
        if a.startswith("--") or not lines:
            lines.append(shlex.quote(a))
        else:
            lines[-1] += " " + shlex.quote(a)
    return lines


def write_plots(study: optuna.Study, out: Path, n_complete: int) -> list[Path]:
    """Optuna's history, intermediate values, parallel coordinates and importances, where they apply;
    a plot that fails is a warning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    plots = {"history": ovm.plot_optimization_history}
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate"] = ovm.plot_intermediate_values
    if n_complete >= 1 and study.best_trial.params:
        plots["parallel_coordinate"] = ovm.plot_parallel_coordinate
    if n_complete >= 2 and len(set(values)) > 1:
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
