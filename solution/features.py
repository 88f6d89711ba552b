"""``python -m solution.features``: the command line of :mod:`solution.retrieval.encode`."""
import sys

from solution.common import run_cli
from solution.retrieval.encode import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
