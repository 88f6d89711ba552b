"""Tiny learnable LMDB splits for the trainer tests: coloured squares with colour-name texts."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import pytest
from cli_helpers import one_error_line
from PIL import Image

from solution.data.lmdb_io import write_split

COLOURS = [
    ("红色", (220, 30, 30)),
    ("绿色", (30, 180, 40)),
    ("蓝色", (30, 60, 220)),
    ("黄色", (240, 220, 30)),
    ("紫色", (140, 40, 170)),
    ("青色", (30, 200, 200)),
    ("黑色", (10, 10, 10)),
    ("白色", (245, 245, 245)),
]


def _png(rgb, rng: random.Random, size: int = 16) -> bytes:
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in rgb)
    im = Image.new("RGB", (size, size), jitter)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.urlsafe_b64encode(buf.getvalue())


def make_split(
    split_dir: Path,
    *,
    per_colour: int,
    colours: int = 8,
    seed: int = 0,
    first_image_id: int = 1,
    text_id_base: int = 0,
    broken=lambda pairs: (),
) -> Path:
    """``per_colour`` images of each colour; one text (query) per colour, paired with each of its images. The images
    whose ids ``broken(pairs)`` names (pairs in their stored order) are undecodable."""
    rng = random.Random(seed)
    images, pairs = [], []
    image_id = first_image_id
    for c, (name, rgb) in enumerate(COLOURS[:colours]):
        for _ in range(per_colour):
            images.append((image_id, _png(rgb, rng)))
            pairs.append((image_id, text_id_base + c, name))
            image_id += 1
    rng.shuffle(pairs)
    bad = set(broken(pairs))
    write_split(
        split_dir, [(i, base64.urlsafe_b64encode(b"not an image") if i in bad else b) for i, b in images], pairs
    )
    return split_dir


def make_data(root: Path, per_colour_train: int = 6, per_colour_valid: int = 3, colours: int = 8) -> tuple[Path, Path]:
    train = make_split(root / "train", per_colour=per_colour_train, colours=colours, seed=1, first_image_id=1000)
    kw = dict(per_colour=per_colour_valid, colours=colours, seed=2, first_image_id=5000, text_id_base=100)
    return train, make_split(root / "valid", **kw)


TINY = (
    "--vision-model ViT-Tiny --text-model RBT-Tiny --context-length 16 --batch-size 8 --valid-batch-size 16 "
    "--num-workers 0 --valid-num-workers 0 --lr 2e-3 --warmup 2 --wd 0.01 --precision fp32 --device cpu "
    "--no-progress --no-plot --log-interval 1"
)


def error_line(capsys, argv: list[str], main_fn=None) -> str:
    """``cli_helpers.one_error_line`` with exit code 2 asserted (the trainer unless ``main_fn``)."""
    from solution.training.trainer import main

    with pytest.MonkeyPatch.context() as m:
        code, line = one_error_line(capsys, m, main_fn or main, argv)
    assert code == 2, line
    return line


def metrics(run: Path, kind: str | None = None) -> list[dict]:
    """The rows of a run folder's ``metrics.jsonl`` (of one kind: "train" or "valid")."""
    rows = [json.loads(x) for x in open(Path(run) / "metrics.jsonl", encoding="utf-8")]
    return [r for r in rows if kind in (None, r["kind"])]


def tiny_argv(train: Path, valid: Path | None, logs: Path, name: str = "run", **flags) -> list[str]:
    """The trainer's command line for a tiny model on the CPU, plus ``flags`` (True: a switch, None/False: left out)."""
    argv = ["--train-data", str(train), "--logs", str(logs), "--name", name, *TINY.split()]
    if valid is not None:
        argv += ["--val-data", str(valid)]
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not False and v is not None:
            argv += [flag, *map(str, v)] if isinstance(v, (list, tuple)) else [flag, str(v)]
    return argv


# A trainer process that, right after its first write of a temporary file of HOOK_FILE (``.NAME.*.tmp``, i.e.
# inside atomic_path, before the rename), signals HOOK_READY and sleeps, holding whatever it holds.
HOOKED_TRAIN = """\
import os, sys, time
import torch
real = torch.save
def save(obj, f, *a, **k):
    real(obj, f, *a, **k)
    name = os.path.basename(str(f))
    if name.startswith("." + os.environ["HOOK_FILE"] + ".") and name.endswith(".tmp"):
        open(os.environ["HOOK_READY"], "w").close()
        time.sleep(300)
torch.save = save
from solution.common import run_cli
from solution.training.trainer import main
sys.exit(run_cli(main, sys.argv[1:]))
"""


def paused_train(tmp_path: Path, argv: list[str], file: str):
    """Start the trainer on ARGV as a subprocess that pauses in its first write of ``file``; returns (proc, ready)."""
    import os
    import subprocess
    import sys

    script, ready = tmp_path / "paused_train.py", tmp_path / "ready"
    script.write_text(HOOKED_TRAIN, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", HOOK_FILE=file, HOOK_READY=str(ready))
    proc = subprocess.Popen(
        [sys.executable, str(script), *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    return proc, ready
