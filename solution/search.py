"""Optuna hyperparameter search over fine-tuning runs, pruned on validation recall.

``bash scripts/search.sh --config configs/search/demo-cpu.yaml`` (= ``python -m solution.search``).

Each trial is an ordinary run in ``{out}/{name}/trials/{number:04d}/`` (soup ingredients: ``model_soup.sh
--from-study DIR --top N``; with ``report-to: tensorboard`` in ``base``, ``tensorboard --logdir {out}/{name}``
shows the trials side by side), valued at its best validation mean recall; a failed one is FAIL with its reason.

Config (YAML)::

    name: demo                 # study name (--study-name)
    n_trials: 6                # target count of finished trials (complete + pruned + failed)
    out: runs/search           # study folder = {out}/{name}/ (the default when out: is missing)
    storage: null              # default sqlite:///{out}/{name}/study.db; an Optuna RDB URL; journal:PATH
    heartbeat: 60              # RDB storages: a running trial beats every N s (0: off); one silent for
    grace_period: null         # grace_period s (default 3 x heartbeat) is failed and re-run elsewhere
    pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 0}   # or hyperband / none
    sampler: {name: tpe, seed: null, n_startup_trials: 4}            # or random
    mode: inprocess            # or subprocess (a clean child per trial; torchrun_nproc: N)
    gpus_per_trial: 0          # N > 0: each running trial leases N GPUs of its own
    gpus: null                 # the GPUs to lease from, e.g. "0,1,2,3" (null: CUDA_VISIBLE_DEVICES or all)
    gpu_lease_dir: null        # lease folder of the node (null: {tmp}/solution-gpu-leases-UID)
    report_at: step            # the pruner's x axis: step | epoch (batch size varies: validate per epoch)
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

``--set FLAG=VALUE`` overrides a base flag (``FLAG=`` drops it); a flag or value the trainer refuses stops the
search before its first trial. Re-running resumes; workers on one storage share the study. A dead worker's trial
is failed (at once by a worker on its host, else after ``grace_period``), not counted, and re-queued once. Outputs
in ``{out}/{name}/``, after every trial: ``trials.csv``, ``best_command.sh``, ``best_config.yaml``, plots.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from solution.model.registry import run_model_cli
from solution.studies.search_config import STUDY_KEYS, load_config
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
    p.add_argument("--gpus-per-trial", type=int, metavar="N", help="each running trial leases N GPUs of its own")
    p.add_argument("--gpus", help="the GPUs this worker may lease, e.g. 0,1,2,3 (default: CUDA_VISIBLE_DEVICES)")
    p.add_argument("--gpu-lease-dir", help="the node's GPU lease folder (default {tmp}/solution-gpu-leases-UID)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"])
    p.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    p.add_argument(
        "--set", action="append", default=[], metavar="FLAG=VALUE", help="override a base flag; FLAG= drops it"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Run (or resume) the study; its summary is the last line of stdout."""
    a = build_parser().parse_args(argv)
    settings = {k: v for k, v in vars(a).items() if k in STUDY_KEYS and k != "pruner"}
    cfg = load_config(a.config, a.set, a.pruner, name=a.study_name, plots=False if a.no_plots else None, **settings)
    return search(cfg, stream=sys.stdout)


if __name__ == "__main__":
    sys.exit(run_model_cli(main))
