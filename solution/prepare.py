"""``python -m solution.prepare``: the command line of :mod:`solution.data.build`."""
import sys

from solution.common import run_cli
from solution.data.build import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
