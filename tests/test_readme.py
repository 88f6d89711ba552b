"""README.md works as written: every ```bash block of its "The flow" section runs in order, as ``bash -e``, on tiny
data from a scratch folder; only the placeholders and sizes of the table below are replaced."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from solution.data.synthetic import generate
from solution.model import ModelConfig, build_model

pytestmark = pytest.mark.xdist_group("readme")  # the blocks run in order, in one working folder
ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## The flow"
LINKED = ("Chinese-CLIP", "scripts", "configs")  # what README's relative paths expect beside the working folder

# README placeholder or size -> what it stands for here, applied in this order to every block.
SUBSTITUTIONS = [
    # Step 4's soup command is prose (inline code), not a block: the fine-tuned checkpoint stands in for its soup.
    ("soups/NAME/soup.pt", "logs/my_run/checkpoints/best.pt"),
    ("GOLD.jsonl", "DIR/test_answers.jsonl"),  # the demo data's held-out answers, in the official gold format
    ("clip_cn_vit-b-16.pt", "{checkpoint}"),  # a tiny checkpoint in the official layout (no config inside)
    ("ViT-B-16", "ViT-Tiny"),
    ("RoBERTa-wwm-ext-base-chinese", "RBT-Tiny"),
    ("--batch-size 128", "--batch-size 8"),
    ("--max-epochs 3", "--max-epochs 1"),
    ("--warmup 100", "--warmup 2"),
    ("pairs.csv", "{csv}"),
]
# A command with --csv is README's other input format: it gets a folder of its own, so the MUGE
# split the later steps use is not replaced by the CSV's.
CSV_COMMAND = "--csv"
# Blocks that need a server (the multi-machine search recipe) are skipped, not run.
NEEDS_SERVER = re.compile(r"postgres|optuna-dashboard|pg_ctl|mysql://", re.IGNORECASE)


def flow_blocks(text: str) -> list[str]:
    """The ```bash blocks of README's "The flow" section, dedented, in order."""
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    section = text[start : nxt if nxt >= 0 else len(text)]
    return [
        textwrap.dedent(m.group(2))
        for m in re.finditer(r"^([ \t]*)```bash\n(.*?)^\1```", section, re.DOTALL | re.MULTILINE)
    ]


def commands(block: str) -> list[str]:
    """The block's logical lines (continuations joined), comments and blank lines dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        out.append(" ".join(cur.split()))
        cur = ""
    if cur:
        out.append(" ".join(cur.split()))
    return out


def substitute(command: str, paths: dict) -> str:
    for old, new in SUBSTITUTIONS:
        command = command.replace(old, new)
    data_dir = paths["csv_dir"] if CSV_COMMAND in command.split() else paths["data_dir"]
    command = re.sub(r"\bDIR\b", data_dir, command)
    for key, value in paths.items():
        command = command.replace("{" + key + "}", value)
    return command


BLOCKS = flow_blocks(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder laid out as README expects: tiny demo data, a tiny checkpoint, a CSV of pairs."""
    w = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (w / name).symlink_to(ROOT / name)
    data = w / "data"
    generate(data, preset="tiny", images_per_query=4)  # 12 test images: enough for README's top-10
    torch.manual_seed(0)
    weights = {f"module.{k}": v for k, v in build_model(ModelConfig("ViT-Tiny", "RBT-Tiny")).state_dict().items()}
    checkpoint = w / "clip_cn_tiny.pt"  # as upstream ships them: module.-prefixed weights, no config
    torch.save({"epoch": 0, "step": 0, "name": "clip_cn_tiny", "state_dict": weights}, checkpoint)
    images = w / "csv_images"
    images.mkdir()
    rows = ["text,image_path"]
    for q in range(10):
        for j in range(2):
            Image.new("RGB", (24, 24), (25 * q, 120 + 60 * j, 200 - 20 * q)).save(images / f"{q}_{j}.png")
            rows.append(f"第{q}种颜色的方块,csv_images/{q}_{j}.png")
    (w / "pairs.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SOLUTION_CACHE_DIR": str(w / "cache"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",  # tiny models: threads only contend on shared CPUs
    }
    paths = {
        "data_dir": str(data),
        "csv_dir": str(w / "csv_data"),
        "checkpoint": str(checkpoint),
        "csv": str(w / "pairs.csv"),
    }
    return w, paths, env, {}


def test_readme_has_the_flow_blocks():
    assert len(BLOCKS) >= 3, "README's flow lost its command blocks"
    flat = "\n".join(BLOCKS)
    for step in ("solution.prepare", "train_clip.sh", "feature_extract.sh", "predict.sh", "solution.evaluate"):
        assert step in flat, step
    for old, _ in SUBSTITUTIONS:  # a placeholder README no longer uses is a stale line in the table
        assert old in flat, f"README no longer says {old!r}: update SUBSTITUTIONS"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_block_runs(workdir, index):
    w, paths, env, done = workdir
    block = BLOCKS[index]
    if NEEDS_SERVER.search(block):
        done[index] = "skipped"
        pytest.skip("needs a database server (the multi-machine search recipe); not run here")
    failed = [i for i in range(index) if done.get(i) == "failed"]
    if failed:
        pytest.skip(f"README block {failed[0] + 1} failed, and this one runs on its outputs")
    cmds = [substitute(c, paths) for c in commands(block)]
    script = "set -euxo pipefail\n" + "\n".join(cmds) + "\n"
    done[index] = "failed"
    r = subprocess.run(["bash", "-c", script], cwd=w, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README block {index + 1} failed (exit {r.returncode}):\n{script}\n{r.stderr[-4000:]}"
    done[index] = "ok"
    if "predict.sh" in block:  # the README's feature names are read back under the names they were written
        sub = w / "submissions" / "NAME.jsonl"
        queries = (Path(paths["data_dir"]) / "test_texts.jsonl").read_text(encoding="utf-8").splitlines()
        assert sub.is_file() and len(sub.read_text(encoding="utf-8").splitlines()) == len(queries)
    if "GOLD.jsonl" in block:
        assert json.loads((w / "score.json").read_text())["success"] is True
