"""``python -m solution.prepare``: raw image-text data -> cn_clip's LMDB layout (:func:`.data.make_lmdb.prepare`).
Prints one JSON line of counts per split; the full report is in each ``LMDB_DIR/{split}/report.json``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from solution.common import SolutionError, run_cli
from solution.data.images import CHECKS, DEFAULT_MAX_PIXELS, DEFAULT_QUALITY
from solution.data.make_lmdb import prepare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m solution.prepare",
        description="Inputs -> cleaned images + texts -> cn_clip's LMDB layout, with a report of everything skipped.",
    )
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", required=True, help="MUGE folder (read or written)")
    p.add_argument("--splits", required=True, help="comma-separated splits, e.g. train,valid,test")
    p.add_argument("--lmdb-dir", "--lmdb_dir", dest="lmdb_dir", help="output directory (default DATA_DIR/lmdb)")
    p.add_argument("--max-side", type=int, help="shrink images so the longer side is at most N px (JPEG re-encode)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of re-encoded images")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="more pixels: a decompression bomb")
    p.add_argument("--check", choices=CHECKS, default=CHECKS[0], help="structural: JPEG markers only; full: decode all")
    p.add_argument("--workers", help=argparse.SUPPRESS)
    p.add_argument("--make-valid", type=float, metavar="FRACTION", help="split off this fraction of queries as valid")
    p.add_argument("--valid-name", default="valid", help="name of the split --make-valid creates")
    p.add_argument("--seed", type=int, default=0, help="seed for --make-valid")
    p.add_argument(
        "--csv",
        "--captions",
        dest="table",
        metavar="FILE",
        help="instead of MUGE files: a CSV/TSV (text,image_path[,text_id,image_id,split]) or JSON lines "
        "({image, text, ...}); '{split}' in the name = one file per split; the MUGE files are written to DATA_DIR",
    )
    p.add_argument("--images-dir", help="the folder the image paths of --csv are relative to (default: its folder)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (shown only on a tty)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    a = vars(build_parser().parse_args(argv))
    if a.pop("workers") is not None:
        raise SolutionError("--workers is gone: images are cleaned in one process; drop the flag")
    reports = prepare(**a)  # the flags' names are prepare's
    counts = {s: {k: r[k] for k in ("num_images", "num_samples")} for s, r in reports.items()}
    for s, r in reports.items():
        counts[s].update(skipped_images=r["images"]["skipped"], skipped_texts=r["texts"]["skipped"])
    print(json.dumps(counts))
    return reports


if __name__ == "__main__":
    sys.exit(run_cli(main))
