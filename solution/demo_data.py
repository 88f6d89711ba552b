"""``python -m solution.demo_data``: the command line of :mod:`solution.data.synthetic`."""
import sys

from solution.common import run_cli
from solution.data.synthetic import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
