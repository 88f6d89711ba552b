"""``python -m solution.search``: the command line of :mod:`solution.studies.runner`."""
import sys

from solution.common import run_cli
from solution.studies.runner import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
