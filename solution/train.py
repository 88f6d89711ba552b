"""``python -m solution.train``: the command line of :mod:`solution.training.trainer`."""

from solution.model.registry import run_model_cli
from solution.training.trainer import main

if __name__ == "__main__":
    raise SystemExit(run_model_cli(main))
