"""Preparation throughput: ours (``python -m solution.prepare``) vs cn_clip's ``build_lmdb_dataset.py``.

Both run as subprocesses on the same base64 TSV (drawn demo images, JPEG, with the demo's share
of PNG/GIF mess), in one run. Reported per tool: wall seconds, images/s, the ratio ours/upstream,
the CPU the tool's processes used (user+sys of the process tree / wall, in cores) and the mean
busy % of each core over the run (psutil; the machine may be shared, so that includes others).

Note that upstream only copies base64 strings into LMDB; ours decodes and checks every image
(``--check full``) or reads JPEG markers only (``--check fast``).

    python scripts/bench_prepare.py [--quick] [--images N] [--image-size PX] [--out bench.json]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from solution.demo_data import draw_image, jpeg_bytes, messy_bytes, random_scene


def make_tsv(d: Path, n: int, size: int, unique: int = 200, seed: int = 0) -> None:
    """``n`` images (``unique`` distinct drawings repeated under distinct ids), 1% PNG/GIF mess."""
    rng = random.Random(seed)
    pics = []
    for k in range(unique):
        im = draw_image(random_scene(rng, 0.5), random.Random(k), size)
        kind = ("png_rgba", "gif", "png_palette")[k % 3] if k % 100 == 0 else None
        pics.append(base64.urlsafe_b64encode(messy_bytes(kind, im) if kind else jpeg_bytes(im)).decode())
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "train_imgs.tsv", "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(f"{1_000_000 + i}\t{pics[i % unique]}\n")
    with open(d / "train_texts.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text_id": i, "text": f"图片{i % 997}", "image_ids": [1_000_000 + i]},
                               ensure_ascii=False) + "\n")


def run(cmd: list[str]) -> dict:
    """Run ``cmd``; wall time, CPU of its process tree (cores) and mean per-core busy %."""
    samples: list[list[float]] = []
    stop = threading.Event()

    def sample():
        psutil.cpu_percent(percpu=True)
        while not stop.wait(0.1):
            samples.append(psutil.cpu_percent(percpu=True))

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    per_core = [round(sum(c) / len(samples), 1) for c in zip(*samples)] if samples else []
    return {"seconds": round(wall, 3), "cpu_cores_used": round(cpu / wall, 2), "core_busy_percent": per_core}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (2,000 images)")
    p.add_argument("--images", type=int, help="images in the TSV (default 20,000; --quick 2,000)")
    p.add_argument("--image-size", type=int, default=224, help="side of the drawn images (default 224)")
    p.add_argument("--workers", type=int, help="our cleaning processes (default: all cores)")
    p.add_argument("--out", help="also write the results as JSON here")
    a = p.parse_args(argv)
    n = a.images or (2_000 if a.quick else 20_000)
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        make_tsv(tmp / "data", n, a.image_size)
        mb = (tmp / "data" / "train_imgs.tsv").stat().st_size / 1e6
        py = sys.executable
        workers = ["--workers", str(a.workers)] if a.workers is not None else []
        runs = {
            "upstream build_lmdb_dataset": [py, "-m", "cn_clip.preprocess.build_lmdb_dataset", "--data_dir",
                                            str(tmp / "data"), "--splits", "train", "--lmdb_dir", str(tmp / "up")],
            "ours --check full": [py, "-m", "solution.prepare", "--data-dir", str(tmp / "data"), "--splits", "train",
                                  "--lmdb-dir", str(tmp / "full"), "--no-progress", *workers],
            "ours --check fast": [py, "-m", "solution.prepare", "--data-dir", str(tmp / "data"), "--splits", "train",
                                  "--lmdb-dir", str(tmp / "fast"), "--check", "fast", "--no-progress", *workers],
        }
        results = {}
        for name, cmd in runs.items():
            r = run(cmd)
            r["images_per_second"] = round(n / r["seconds"], 1)
            results[name] = r
        up = results["upstream build_lmdb_dataset"]["images_per_second"]
        for r in results.values():
            r["ratio_ours_over_upstream"] = round(r["images_per_second"] / up, 3)
        load = os.getloadavg()[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{n} images of {a.image_size} px ({mb:.1f} MB of base64), {psutil.cpu_count()} cores, load {load:.1f}")
    print(f"{'tool':30s} {'seconds':>8s} {'images/s':>10s} {'ratio':>6s} {'cores':>6s}  per-core busy %")
    for name, r in results.items():
        print(f"{name:30s} {r['seconds']:8.2f} {r['images_per_second']:10.1f} {r['ratio_ours_over_upstream']:6.2f} "
              f"{r['cpu_cores_used']:6.2f}  {r['core_busy_percent']}")
    out = {"images": n, "image_size": a.image_size, "tsv_mb": round(mb, 1), "load_average": load, "results": results}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
