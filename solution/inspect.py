"""Browse a submission's failures: one self-contained HTML page of its queries, worst first, with their images.

``python -m solution.inspect --submission A.jsonl [--against B.jsonl] --texts valid_texts.jsonl
--image-data DATA/lmdb/valid/imgs [--answers GOLD.jsonl] --output inspect/NAME.html``: each query's
text, its top-10 thumbnails (gold framed) and hits at 1/5/10; a text filter; with ``--against``, the
queries B fixes and breaks and B - A's mean recall with a 95% paired-bootstrap interval. The work:
:mod:`solution.report.failures`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from solution.common import run_cli
from solution.report.failures import inspect


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solution.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--submission", required=True, metavar="A.jsonl", help="MUGE submission: text_id and 10 image_ids")
    p.add_argument("--against", metavar="B.jsonl", help="a second submission: the queries it fixes and breaks")
    p.add_argument("--texts", required=True, metavar="JSONL", help="the split's MUGE texts (with image_ids: answers)")
    p.add_argument("--image-data", required=True, metavar="DIR", help="the split's LMDB images: DATA/lmdb/SPLIT/imgs")
    p.add_argument("--answers", metavar="GOLD.jsonl", help="gold answers, when the texts carry none")
    p.add_argument("--output", required=True, metavar="HTML", help="the page to write, e.g. inspect/NAME.html")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Write the page; returns its summary (recalls, and with --against the fixed/broken counts and interval)."""
    return inspect(**vars(build_parser().parse_args(argv)), progress=sys.stderr.isatty())


if __name__ == "__main__":
    sys.exit(run_cli(main))
