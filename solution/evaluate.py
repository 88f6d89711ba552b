"""``python -m solution.evaluate``: the command line of :mod:`solution.retrieval.evaluate`."""
import sys

from solution.common import run_cli
from solution.retrieval.evaluate import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
