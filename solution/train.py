"""``python -m solution.train``: the command line of :mod:`solution.training.trainer`."""

import os
import sys

from solution.common import run_cli
from solution.model.registry import env_config_dirs, model_config_dirs
from solution.training.trainer import main

if __name__ == "__main__":
    with model_config_dirs(env_config_dirs(os.environ)):
        sys.exit(run_cli(main))
