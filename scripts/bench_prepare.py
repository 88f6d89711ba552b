"""Preparation throughput: ours (``python -m solution.prepare``) vs cn_clip's ``build_lmdb_dataset.py``.

Both run as subprocesses, with their default flags, on the same base64 TSV (drawn demo images,
JPEG), in one run, interleaved ``--repeat`` times (medians reported: the machine may be shared).
Each TSV of ``--mess`` is measured on its own: 0 is a clean TSV, where both tools produce the same
LMDB; 0.01 has 1% PNG/GIF named like the JPEGs, which ours converts to RGB JPEG (about a
millisecond each) and upstream stores as they are. Reported per tool: wall seconds, images/s,
the ratio ours/upstream (>= 1: ours is not slower), the CPU its process tree used (user+sys
seconds, and / wall = cores busy) and the mean busy % of each core over the run (psutil; that
includes other users of the machine).

Both run with Python's bytecode cached (``PYTHONPYCACHEPREFIX`` in the run's temp folder, one
untimed warm-up run of each tool first): an installed cn_clip has its ``.pyc`` files, and a shell
with ``PYTHONDONTWRITEBYTECODE`` set would otherwise make ours compile its modules on every run.

Upstream only copies base64 strings into LMDB. Ours checks every image: ``--check structural``
(the default: JPEG marker structure on the base64 itself, no pixel decoded) or ``--check full``
(decode every image too), and converts the non-JPEGs.

    python scripts/bench_prepare.py [--quick] [--images N] [--mess 0,0.01] [--repeat R] [--out bench.json]

``--out`` JSON: ``{"rows": [{"metric", "ours", "upstream", "ratio", "unit"}, ...], <meta>}``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from solution.data.images import CHECKS
from solution.data.synthetic import draw_image, jpeg_bytes, messy_bytes, random_scene


def make_tsv(d: Path, n: int, size: int, mess: float = 0.01, unique: int = 200, seed: int = 0) -> None:
    """``n`` images (``unique`` distinct drawings repeated under distinct ids), a fraction ``mess`` of
    them PNG/GIF (every ``1 / mess``-th drawing)."""
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


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall time, CPU of its process tree and mean per-core busy %."""
    samples: list[list[float]] = []
    stop = threading.Event()

    def sample():
        psutil.cpu_percent(percpu=True)
        while not stop.wait(0.1):
            samples.append(psutil.cpu_percent(percpu=True))

    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes grandchildren (pool workers) once reaped
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    per_core = [round(sum(c) / len(samples), 1) for c in zip(*samples)] if samples else []
    return {"seconds": wall, "cpu_seconds": cpu, "core_busy_percent": per_core}


def _median_run(runs: list[dict], n: int) -> dict:
    walls = sorted(r["seconds"] for r in runs)
    mid = min(runs, key=lambda r: abs(r["seconds"] - statistics.median(walls)))
    cpu = statistics.median(r["cpu_seconds"] for r in runs)
    wall = statistics.median(walls)
    return {
        "seconds": round(wall, 3),
        "seconds_all": [round(w, 3) for w in walls],
        "images_per_second": round(n / wall, 1),
        "cpu_seconds": round(cpu, 3),
        "cpu_cores_used": round(cpu / wall, 2),
        "core_busy_percent": mid["core_busy_percent"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (2,000 images, 1 repeat)")
    p.add_argument("--images", type=int, help="images in each TSV (default 20,000; --quick 2,000)")
    p.add_argument("--image-size", type=int, default=224, help="side of the drawn images (default 224)")
    p.add_argument("--mess", default="0,0.01", help="fractions of PNG/GIF, one TSV each (default 0,0.01)")
    p.add_argument("--repeat", type=int, help="interleaved runs of each tool, medians reported (default 3; --quick 1)")
    p.add_argument("--workers", type=int, help="our cleaning processes (default: all cores)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"our --check modes to run (default {','.join(CHECKS)})")
    p.add_argument("--out", help="also write the results as JSON here")
    a = p.parse_args(argv)
    n = a.images or (2_000 if a.quick else 20_000)
    repeat = max(1, a.repeat or (1 if a.quick else 3))
    checks = [c for c in a.checks.split(",") if c]
    if not checks or set(checks) - set(CHECKS):
        raise SystemExit(f"--checks takes some of {','.join(CHECKS)}")
    messes = [float(m) for m in a.mess.split(",") if m.strip()]
    if not messes or any(not 0 <= m < 1 for m in messes):
        raise SystemExit("--mess takes fractions in [0, 1), e.g. 0,0.01")
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    load_before = os.getloadavg()
    py = sys.executable
    workers = ["--workers", str(a.workers)] if a.workers is not None else []
    rows, results, sizes = [], {}, {}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")  # bytecode cached for both tools, outside the repo
    warm = True
    try:
        for mess in messes:
            data = tmp / f"data_{mess:g}"
            make_tsv(data, n, a.image_size, mess)
            sizes[f"{mess:g}"] = round((data / "train_imgs.tsv").stat().st_size / 1e6, 1)
            runs = {
                "upstream": [
                    py,
                    "-m",
                    "cn_clip.preprocess.build_lmdb_dataset",
                    "--data_dir",
                    str(data),
                    "--splits",
                    "train",
                    "--lmdb_dir",
                    str(tmp / "out"),
                ]
            }
            for check in checks:
                runs[check] = [
                    py,
                    "-m",
                    "solution.prepare",
                    "--data-dir",
                    str(data),
                    "--splits",
                    "train",
                    "--lmdb-dir",
                    str(tmp / "out"),
                    "--check",
                    check,
                    *workers,
                ]
            raw: dict[str, list[dict]] = {name: [] for name in runs}
            for name, cmd in runs.items() if warm else ():  # untimed: compiles each tool's modules once
                run(cmd, env)
                shutil.rmtree(tmp / "out", ignore_errors=True)
            warm = False
            for _ in range(repeat):
                for name, cmd in runs.items():
                    raw[name].append(run(cmd, env))
                    shutil.rmtree(tmp / "out", ignore_errors=True)
            res = results[f"{mess:g}"] = {name: _median_run(r, n) for name, r in raw.items()}
            shutil.rmtree(data, ignore_errors=True)
            up = res["upstream"]
            tsv = f"{mess:.0%} PNG/GIF"
            for check in checks:
                ours = res[check]
                rows += [
                    {
                        "metric": f"images/s, {tsv}, --check {check}",
                        "ours": ours["images_per_second"],
                        "upstream": up["images_per_second"],
                        "ratio": round(ours["images_per_second"] / up["images_per_second"], 3),
                        "unit": "images/s",
                    },
                    {
                        "metric": f"CPU cores busy, {tsv}, --check {check}",
                        "ours": ours["cpu_cores_used"],
                        "upstream": up["cpu_cores_used"],
                        "ratio": round(ours["cpu_cores_used"] / max(up["cpu_cores_used"], 1e-9), 3),
                        "unit": "cores",
                    },
                    {
                        "metric": f"CPU seconds, {tsv}, --check {check}",
                        "ours": ours["cpu_seconds"],
                        "upstream": up["cpu_seconds"],
                        "ratio": round(ours["cpu_seconds"] / max(up["cpu_seconds"], 1e-9), 3),
                        "unit": "s",
                    },
                ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    print(
        f"{n} images of {a.image_size} px per TSV (MB of base64: {sizes}), {psutil.cpu_count()} cores, "
        f"median of {repeat} (after an untimed warm-up run of each, bytecode cached), load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(f"{'metric':48s} {'ours':>9s} {'upstream':>9s} {'ratio':>6s}  unit")
    for r in rows:
        print(f"{r['metric']:48s} {r['ours']:9.2f} {r['upstream']:9.2f} {r['ratio']:6.2f}  {r['unit']}")
    for mess, res in results.items():
        for name, r in res.items():
            print(f"  mess {mess:5s} {name:10s} wall {r['seconds_all']} s, per-core busy % {r['core_busy_percent']}")
    out = {
        "rows": rows,
        "images": n,
        "image_size": a.image_size,
        "tsv_mb": sizes,
        "repeat": repeat,
        "cores": psutil.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "results": results,
    }
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
