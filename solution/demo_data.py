"""``python -m solution.demo_data``: write the demo dataset (:func:`solution.data.synthetic.generate`); prints one
JSON line: the output folder and the queries/images of each split."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from solution.common import run_cli
from solution.data.synthetic import PRESETS, Sizes, generate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m solution.demo_data",
        description="Write a procedurally drawn Chinese image-text dataset in MUGE layout.",
    )
    p.add_argument("--out", required=True, help="output directory (MUGE layout)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="tiny (tests), small or default (demo)")
    p.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels (default 64)")
    for f in dataclasses.fields(Sizes):
        kind = float if f.type in (float, "float") else int
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, help=f"override the preset's {f.name}")
    p.add_argument("--no-mess", action="store_true", help="leave out the deliberately messy images")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    sizes = {f.name: getattr(a, f.name) for f in dataclasses.fields(Sizes)}
    info = generate(a.out, preset=a.preset, image_size=a.image_size, seed=a.seed, messy=not a.no_mess, **sizes)
    print(json.dumps({k: info[k] for k in ("out_dir", "splits")}, ensure_ascii=False))
    return info


if __name__ == "__main__":
    sys.exit(run_cli(main))
