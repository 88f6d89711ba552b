"""Compare validation results of training runs, soups, search studies and ensembles: one table and one plot.

``python -m solution.compare logs/run_a soups/NAME search/STUDY [--csv] [--output FILE] [--plot PNG]``.
Each PATH is a run folder, a soup folder, a study folder, an ensemble folder, the file that marks one
(``metrics.jsonl``, ``soup_log.jsonl``, ``trials.csv``, ``ensemble.json``), or a folder holding them (a few
levels deep). The table (:mod:`solution.report.table`) goes to stdout and to ``--output``; outputs that
would replace an input are refused before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from solution.common import run_cli
from solution.report.table import compare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solution.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="run dirs, soup dirs, study dirs, or folders holding them")
    p.add_argument("--csv", action="store_true", help="CSV instead of a markdown table")
    p.add_argument("--output", metavar="FILE", help="also write the table here")
    p.add_argument("--plot", metavar="PNG", default="compare.png", help="where to draw the curves")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--params", metavar="KEYS", help="comma-separated settings to show (default: those that differ)")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    """Print the table (and write the files asked for); returns the table's text."""
    a = build_parser().parse_args(argv)
    params = [k.strip() for k in a.params.split(",") if k.strip()] if a.params else None
    text = compare(a.paths, csv=a.csv, output=a.output, plot_path=None if a.no_plot else a.plot, params=params)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    sys.exit(run_cli(main))
