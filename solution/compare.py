"""Compare validation results of training runs, soups, search studies and ensembles: one table and one plot.

``python -m solution.compare PATH ...``: a markdown digest on stdout (``--csv`` or ``--output x.csv``: the full
table); each PATH a folder, the file that marks one, or a folder holding them (:mod:`solution.report.table`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from solution.common import run_cli
from solution.report.table import compare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solution.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="run dirs, soup dirs, study dirs, or folders holding them")
    p.add_argument("--csv", action="store_true", help="print the full table as CSV instead of the markdown digest")
    p.add_argument("--output", metavar="FILE", help="also write the table here (FILE.csv: the full table)")
    p.add_argument("--plot", metavar="PNG", default="compare.png", help="where to draw the curves")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    """Print the table (and write the files asked for); returns the printed text."""
    a = build_parser().parse_args(argv)
    text = compare(a.paths, csv=a.csv, output=a.output, plot_path=None if a.no_plot else a.plot)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    sys.exit(run_cli(main))
