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
    gpus_per_trial: 0          # N > 0: each running trial leases N GPUs of its own (see below)
    gpus: null                 # the GPUs to lease from, e.g. "0,1,2,3" (null: CUDA_VISIBLE_DEVICES or all)
    gpu_lease_dir: null        # lease folder of the node (null: {tmp}/solution-gpu-leases-UID)
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
FAIL, not counted, and its parameters re-queued once (solution.studies.storage): by heartbeat on an
RDB, after the grace period, from any machine; by process check on this host for a journal. A
worker that reaches ``n_trials`` waits for the running trials of the others before it exits.

GPUs: with ``gpus_per_trial: N`` each trial leases N GPUs for as long as it runs (an ``flock`` per
GPU in the node's lease folder: released when the trial ends, fails or its worker is killed) and
runs with ``CUDA_VISIBLE_DEVICES`` set to them in its own process (in-process: ``--device cuda:K``);
the workers of one node (one study or several) take disjoint GPUs and wait for free ones. The log
names each trial's GPUs; ``trials.csv`` has them in its ``gpus`` column. Four GPUs, torchrun trials
on two each, two workers: ``python -m solution.search --config C --torchrun-nproc 2 --gpus-per-trial 2 &``
twice.

Outputs in ``{out}/{name}/`` (rewritten after every trial, so a kill leaves them current):
``trials.csv`` (number, state, value, run_dir, params_*, ...), ``best_command.sh`` (a ready
``bash Chinese-CLIP/train_clip.sh ...``), ``best_config.yaml``, ``best.json`` and PNG plots
(history, intermediate values, parameter importances, parallel coordinates). Browse a study
live with ``pip install optuna-dashboard && optuna-dashboard sqlite:///runs/search/demo-cpu/study.db``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from solution.common import run_cli
from solution.model.registry import env_config_dirs, model_config_dirs
from solution.studies.search_config import load_config, override
from solution.studies.study import search


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m solution.search",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 3)[3],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="search config YAML (see configs/search/)")
    p.add_argument("--n-trials", type=int, help="target number of finished trials (overrides the config)")
    p.add_argument("--storage", help="Optuna storage URL or journal:PATH (default sqlite in the study folder)")
    p.add_argument("--study-name", help="study name (default: the config's name)")
    p.add_argument("--out", help="folder holding the study folder (default: the config's out, else runs/search)")
    p.add_argument("--mode", choices=["inprocess", "subprocess"])
    p.add_argument("--torchrun-nproc", type=int, help="subprocess mode: launch each trial with torchrun on N procs")
    p.add_argument(
        "--gpus-per-trial",
        type=int,
        metavar="N",
        help="each running trial leases N GPUs of its own (CUDA_VISIBLE_DEVICES of its process; "
        "in-process: --device cuda:K); the workers of a node take disjoint GPUs; 0: off",
    )
    p.add_argument(
        "--gpus",
        help="the GPUs this worker may lease, e.g. 0,1,2,3 (default: CUDA_VISIBLE_DEVICES, else every GPU torch sees)",
    )
    p.add_argument(
        "--gpu-lease-dir",
        help="the node's GPU lease folder shared by its workers (default {tmp}/solution-gpu-leases-UID)",
    )
    p.add_argument("--pruner", choices=["median", "hyperband", "none"])
    p.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FLAG=VALUE",
        help="override a base training flag (repeatable), e.g. --set device=cpu; FLAG= drops it",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Run (or resume) the study; its summary is the last line of stdout."""
    a = build_parser().parse_args(argv)
    cfg = override(
        load_config(a.config, a.set),
        a.config,
        study_name=a.study_name,
        pruner=a.pruner,
        no_plots=a.no_plots,
        n_trials=a.n_trials,
        storage=a.storage,
        out=a.out,
        mode=a.mode,
        torchrun_nproc=a.torchrun_nproc,
        timeout=a.timeout,
        gpus_per_trial=a.gpus_per_trial,
        gpus=a.gpus,
        gpu_lease_dir=a.gpu_lease_dir,
    )
    return search(cfg, stream=sys.stdout)


if __name__ == "__main__":
    with model_config_dirs(env_config_dirs(os.environ)):
        sys.exit(run_cli(main))
