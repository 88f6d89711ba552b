"""``scripts/gpu_check.sh --quick --device cpu`` on tiny configs, so the script cannot rot before a GPU is at hand:
its exit code, and its report (every case a row, none failed, each figure finite and positive)."""

import json
import math
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("amp", "bf16", "LoRA", "grad checkpointing", "torch.compile")
CASES = ["train ViT-Tiny: our trainer vs cn_clip train()", *(f"train ViT-Tiny step: {s}" for s in STEPS)]
CASES += ["train DDP, 2 processes", "features images/s", "features texts/s", "features images/s, torch.compile"]
CASES += ["features texts/s, torch.compile", "predict top-10", "soup of 2 checkpoints"]


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_check.sh"), "--quick", "--device", "cpu", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # tiny models: threads only contend on shared CPUs
        capture_output=True,
        text=True,
        timeout=300,
    )  # a hang guard (shared CI CPUs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "GPU.json").read_text())
    rows = {r["case"]: r for r in report["rows"]}
    assert list(rows) == CASES
    assert not [r for r in report["rows"] if "failed" in r]
    assert "skipped" in rows["train DDP, 2 processes"]  # no two GPUs here
    measured = [r for r in report["rows"] if "skipped" not in r]
    for r in measured:
        for key in ("ours", "upstream", "ratio"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["case"], key, r[key])
        assert r["ratio"] == (r["upstream"] / r["ours"] if r["unit"] == "s" else r["ours"] / r["upstream"])
    assert rows["soup of 2 checkpoints"]["peak_ours_gib"] > 0  # process RSS, measured on CPU too
    table = (out / "GPU.md").read_text().splitlines()
    body = [ln for ln in table if ln.startswith("| ") and not ln.startswith("| case ")]
    assert [ln.split(" | ")[0][2:].split(" (")[0] for ln in body] == CASES
    assert not any("failed" in ln for ln in body)
