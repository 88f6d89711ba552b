"""``python -m solution.train``: the command line of :mod:`solution.training.trainer`."""

import sys

from solution.common import run_cli
from solution.training.trainer import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
