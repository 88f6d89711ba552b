"""Preparation throughput: ours (``python -m solution.prepare``) vs cn_clip's ``build_lmdb_dataset.py``.

Every tool runs once per round on the same base64 TSV (drawn demo images, JPEG; ``--mess`` of them
PNG/GIF, which ours converts and upstream stores as they are), the order reversed every other round.
Each run is compared with upstream's run of the same round: wall time (images/s) and CPU seconds of
its process tree, ratio > 1 meaning less time than upstream. The table gives the median ratio over
the rounds and its spread ((max - min) / median), and warns when the spread is over 20%: on a shared
machine one round's ratio means little. ``--variant 'NAME=[DIR] [FLAGS]'`` adds ``solution.prepare``
from another checkout (an older commit, a trick switched on or off) or with other flags, compared
with upstream and with ours of the same ``--check``.

    python scripts/bench_prepare.py [--quick] [--images N] [--mess 0,0.01] [--rounds R] [--variant ...] [--out F]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from solution.data.images import CHECKS
from solution.data.synthetic import draw_image, jpeg_bytes, messy_bytes, random_scene

ROOT = Path(__file__).resolve().parents[1]
WIDE = 0.20  # a spread of the per-round ratios above this is flagged


def make_tsv(d: Path, n: int, size: int, mess: float, unique: int = 200, seed: int = 0) -> None:
    """``n`` images (``unique`` drawings repeated under distinct ids), every ``1 / mess``-th drawing a PNG/GIF."""
    rng = random.Random(seed)
    every = round(1 / mess) if mess > 0 else 0
    pics = []
    for k in range(unique):
        im = draw_image(random_scene(rng, 0.5), random.Random(k), size)
        kind = ("png_rgba", "gif", "png_palette")[(k // every) % 3] if every and k % every == 0 else None
        pics.append(base64.urlsafe_b64encode(messy_bytes(kind, im) if kind else jpeg_bytes(im)).decode())
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "train_imgs.tsv", "w", encoding="utf-8") as f:
        f.writelines(f"{1_000_000 + i}\t{pics[i % unique]}\n" for i in range(n))
    with open(d / "train_texts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"text_id": i, "text": f"图片{i % 997}", "image_ids": [1_000_000 + i]}, ensure_ascii=False)
            + "\n"
            for i in range(n)
        )


def timed(cmd: list[str], root: Path, env: dict) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys of the process tree) of ``cmd`` run from (and importing) ``root``."""
    env = {**env, "PYTHONPATH": f"{root}:{root / 'Chinese-CLIP'}"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def ratio(ref: list[float], runs: list[float]) -> dict:
    """The median over rounds of ``ref / run`` (> 1: the run took less), and its spread."""
    ratios = [r / x for r, x in zip(ref, runs)]
    mid = statistics.median(ratios)
    return {
        "ratio": round(mid, 3),
        "ratios": [round(x, 3) for x in ratios],
        "spread": round((max(ratios) - min(ratios)) / mid, 3),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (2,000 images, 2 rounds)")
    p.add_argument("--images", type=int, help="images in each TSV (default 20,000; --quick 2,000)")
    p.add_argument("--image-size", type=int, default=224, help="side of the drawn images (default 224)")
    p.add_argument("--mess", default="0,0.01", help="fractions of PNG/GIF, one TSV each (default 0,0.01)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick 2)")
    p.add_argument("--checks", default=",".join(CHECKS), help="our --check modes to run (default: all)")
    p.add_argument("--variant", action="append", default=[], help="'NAME=DIR [FLAGS]': prepare of another checkout")
    p.add_argument("--out", help="also write the results as JSON here")
    a = p.parse_args(argv)
    n = a.images or (2_000 if a.quick else 20_000)
    rounds = max(1, a.rounds or (2 if a.quick else 5))
    messes = [float(m) for m in a.mess.split(",") if m.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")  # bytecode cached for every tool, outside the repos
    py = [sys.executable, "-m"]
    tools = {"upstream": ([*py, "cn_clip.preprocess.build_lmdb_dataset"], ROOT)}
    refs = {}  # tool -> what it is compared with besides upstream
    for check in a.checks.split(","):
        tools[f"ours --check {check}"] = ([*py, "solution.prepare", "--check", check], ROOT)
    for spec in a.variant:  # compared with ours of the same --check
        name, _, rest = spec.partition("=")
        flags = shlex.split(rest)
        root = "" if not flags or flags[0].startswith("-") else flags.pop(0)
        tools[name] = ([*py, "solution.prepare", *flags], Path(root or ROOT).resolve())
        check = flags[flags.index("--check") + 1] if "--check" in flags else CHECKS[0]
        refs[name] = f"ours --check {check}" if f"ours --check {check}" in tools else list(tools)[1]
    load_before, rows, results = os.getloadavg(), [], {}
    try:
        for mess in messes:
            data = tmp / "data"
            make_tsv(data, n, a.image_size, mess)
            walls: dict[str, list[float]] = {name: [] for name in tools}
            cpus: dict[str, list[float]] = {name: [] for name in tools}
            for r in range(rounds + 1):  # round 0: untimed warm-up (bytecode, page cache)
                for name in list(tools)[:: -1 if r % 2 else 1]:
                    cmd, root = tools[name]
                    argv = [*cmd, "--data_dir", str(data), "--splits", "train", "--lmdb_dir", str(tmp / "out")]
                    wall, cpu = timed(argv, root, env)
                    shutil.rmtree(tmp / "out")
                    if r:
                        walls[name].append(wall)
                        cpus[name].append(cpu)
            res = results[f"{mess:g}"] = {}
            for name in tools:
                wall = statistics.median(walls[name])
                res[name] = {"seconds": round(wall, 3), "images_per_second": round(n / wall, 1)}
                res[name]["cpu_seconds"] = round(statistics.median(cpus[name]), 3)
                for ref in ["upstream", refs.get(name)] if name != "upstream" else []:
                    if ref:
                        res[name][f"vs {ref}"] = {
                            "wall": ratio(walls[ref], walls[name]),
                            "cpu": ratio(cpus[ref], cpus[name]),
                        }
                        for what, unit in (("wall", "images/s"), ("cpu", "CPU s")):
                            r = res[name][f"vs {ref}"][what]
                            key = "images_per_second" if what == "wall" else "cpu_seconds"
                            rows.append(
                                {
                                    "metric": f"{unit}, {mess:.0%} PNG/GIF: {name} vs {ref}",
                                    "ours": res[name][key],
                                    "upstream": res[ref][key],
                                    "ratio": r["ratio"],
                                    "spread": r["spread"],
                                    "unit": unit,
                                }
                            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    print(
        f"{n} images of {a.image_size} px per TSV, {os.cpu_count()} cores, {rounds} interleaved rounds; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(f"{'metric':64s} {'run':>9s} {'vs':>9s} {'ratio':>6s} {'spread':>7s}")
    for r in rows:
        flag = "  WARNING: spread over 20%, too noisy to trust" if r["spread"] > WIDE else ""
        print(f"{r['metric']:64s} {r['ours']:9.2f} {r['upstream']:9.2f} {r['ratio']:6.2f} {r['spread']:7.0%}{flag}")
    for mess, res in results.items():
        for name, r in res.items():
            per_round = {k: v["wall"]["ratios"] for k, v in r.items() if k.startswith("vs ")}
            print(f"  {mess:5s} {name:28s} {r['seconds']:.2f} s, {r['cpu_seconds']:.2f} CPU s, per round {per_round}")
    out = {
        "rows": rows,
        "images": n,
        "image_size": a.image_size,
        "rounds": rounds,
        "cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "results": results,
    }
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
