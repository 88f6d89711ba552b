"""Compare validation results of training runs, soups and search studies: one table and one plot.

``python -m solution.compare logs/run_a logs/run_b soups/NAME search/STUDY [--csv] [--output FILE]
[--plot compare.png]``. Each PATH may be:

- a training run directory (``metrics.jsonl`` + ``params.json``) or its ``metrics.jsonl``;
- a soup folder (``soup_log.jsonl``, + ``summary.json``) or its ``soup_log.jsonl``; a folder made by
  several methods at once holds one soup folder per method;
- a search study folder (``trials.csv`` + ``trials/NNNN/`` run directories): one row per trial;
- any other folder: searched (a few levels deep) for the above.

The table (markdown, or CSV with ``--csv``) goes to stdout and to ``--output``; the rows and columns
are described in :mod:`solution.report.table`; rows with stored per-query hits (soups) also get their
mean-recall difference to the best single model with a 95% paired-bootstrap interval (``vs_ref``,
``ci_low``, ``ci_high``, ``significant``), the others an empty interval and a ``note`` saying why. ``--output`` and ``--plot`` that are folders, sit
under a file or are one of the files read are refused before anything is written; so are malformed
inputs (non-UTF-8 or non-JSON lines, a broken ``trials.csv``), naming file and line.
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
