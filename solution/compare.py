"""``python -m solution.compare``: the command line of :mod:`solution.report.compare`."""
import sys

from solution.common import run_cli
from solution.report.compare import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
