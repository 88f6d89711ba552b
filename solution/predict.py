"""``python -m solution.predict``: the command line of :mod:`solution.retrieval.rank`."""
import sys

from solution.common import run_cli
from solution.retrieval.rank import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
