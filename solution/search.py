"""Optuna hyperparameter search over fine-tuning runs, pruned on validation recall (``bash scripts/search.sh``).
The config's keys and their meaning: configs/search/README.md and the commented configs beside it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from solution.model.registry import run_model_cli
from solution.studies.search_config import STUDY_KEYS, load_config
from solution.studies.study import search


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solution.search", description=__doc__)
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
