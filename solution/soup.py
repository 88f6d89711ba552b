"""``python -m solution.soup``: the command line of :mod:`solution.soups.soup`."""
import sys

from solution.common import run_cli
from solution.soups.soup import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
