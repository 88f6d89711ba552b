"""Score a MUGE submission like the official ``evaluation.py`` (to the digit), or check one before upload.

The work: :mod:`solution.retrieval.official`."""

import argparse
import json
import sys
from collections.abc import Sequence

from solution.common import SolutionError, run_cli
from solution.retrieval.official import check_files, evaluate_files


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m solution.evaluate",
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s GOLD PRED OUT [--direction D]\n       %(prog)s --check PRED --texts TEXTS",
    )
    p.add_argument("paths", nargs="*", metavar="GOLD PRED OUT", help="answers, submission, output JSON (as officially)")
    p.add_argument(
        "--direction", choices=["auto", "t2i", "i2t"], default="auto", help="auto: from the gold (--check: t2i)"
    )
    p.add_argument("--check", metavar="PRED", help="validate a submission without answers")
    p.add_argument("--texts", "--queries", dest="texts", metavar="JSONL", help="with --check: the queries")
    args = p.parse_args(argv)
    if args.check:
        if args.paths or not args.texts:
            raise SolutionError("--check PRED takes --texts QUERIES.jsonl and no positional arguments")
        result = check_files(args.check, args.texts, direction="t2i" if args.direction == "auto" else args.direction)
    elif len(args.paths) != 3:
        raise SolutionError("expected GOLD PRED OUT (or --check PRED --texts QUERIES)")
    else:
        result = evaluate_files(*args.paths, direction=args.direction)
    print(json.dumps(result if args.check else result["scoreJson"]))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
