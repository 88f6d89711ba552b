"""Browse a submission's failures: one self-contained HTML page of its queries, worst first, with their images
(:mod:`solution.report.failures`)."""

import argparse
import sys
from collections.abc import Sequence

from solution.common import run_cli
from solution.report.failures import inspect


def main(argv: Sequence[str] | None = None) -> dict:
    """Write the page; returns its summary (recalls, and with --against the fixed/broken counts and interval)."""
    p = argparse.ArgumentParser(prog="python -m solution.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--submission", required=True, metavar="A.jsonl", help="MUGE submission: text_id and 10 image_ids")
    p.add_argument("--against", metavar="B.jsonl", help="a second submission: the queries it fixes and breaks")
    p.add_argument("--texts", required=True, metavar="JSONL", help="the split's MUGE texts (with image_ids: answers)")
    p.add_argument("--image-data", required=True, metavar="DIR", help="the split's LMDB images: DATA/lmdb/SPLIT/imgs")
    p.add_argument("--answers", metavar="GOLD.jsonl", help="gold answers, when the texts carry none")
    p.add_argument("--output", required=True, metavar="HTML", help="the page to write, e.g. inspect/NAME.html")
    return inspect(**vars(p.parse_args(argv)), progress=sys.stderr.isatty())


if __name__ == "__main__":
    sys.exit(run_cli(main))
