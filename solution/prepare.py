"""``python -m solution.prepare``: raw image-text data -> cn_clip's LMDB layout (:func:`.data.make_lmdb.prepare`).

Prints one JSON line of counts per split; the full report is in each ``LMDB_DIR/{split}/report.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from solution.common import run_cli
from solution.data.images import CHECKS, DEFAULT_MAX_PIXELS, DEFAULT_QUALITY
from solution.data.make_lmdb import prepare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m solution.prepare",
        description="Inputs -> cleaned images + texts -> cn_clip's LMDB layout, with a report of everything skipped.",
    )
    p.add_argument(
        "--data-dir",
        "--data_dir",
        dest="data_dir",
        required=True,
        help="MUGE directory to read (format 1) or to write the MUGE files into (formats 2/3)",
    )
    p.add_argument("--splits", required=True, help="comma-separated splits, e.g. train,valid,test")
    p.add_argument("--lmdb-dir", "--lmdb_dir", dest="lmdb_dir", help="output directory (default DATA_DIR/lmdb)")
    p.add_argument("--max-side", type=int, help="shrink images so the longer side is at most N px (JPEG re-encode)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of re-encoded images")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="images declaring more pixels are skipped as decompression bombs",
    )
    p.add_argument(
        "--check",
        choices=CHECKS,
        default=CHECKS[0],
        help="how a JPEG is checked before it is kept byte for byte. structural (default): its marker "
        "structure only, no pixel decoded (header, plain RGB frame, no EXIF rotation, a scan, the "
        "end marker); damage inside the compressed data of an otherwise intact file goes unnoticed "
        "(solution.data decodes defensively: such an image trains with artefacts or is dropped, never "
        "a crash). full: decode every image as well; catches that too, several times slower",
    )
    p.add_argument("--workers", type=int, help="ignored, for old command lines: images are cleaned in this process")
    p.add_argument(
        "--make-valid",
        type=float,
        metavar="FRACTION",
        help="split this fraction of the first split's queries off as a validation split",
    )
    p.add_argument("--valid-name", default="valid", help="name of the split --make-valid creates")
    p.add_argument("--seed", type=int, default=0, help="seed for --make-valid")
    p.add_argument(
        "--csv",
        help="format 2: CSV/TSV with text,image_path[,text_id,image_id,split]; "
        "'{split}' in the name = one file per split",
    )
    p.add_argument("--images-dir", help="format 3: folder of images (paths in --captions/--csv are relative to it)")
    p.add_argument("--captions", help="format 3: JSON lines {image, text[, text_id, image_id, split]}")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (shown only on a tty)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    reports = prepare(**vars(a))  # the flags' names are prepare's
    print(
        json.dumps(
            {
                s: {
                    "num_images": r["num_images"],
                    "num_samples": r["num_samples"],
                    "skipped_images": r["images"]["skipped"],
                    "skipped_texts": r["texts"]["skipped"],
                }
                for s, r in reports.items()
            }
        )
    )
    return reports


if __name__ == "__main__":
    sys.exit(run_cli(main))
