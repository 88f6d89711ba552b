"""Soups and ensembles log each candidate's selection score (float32) to TensorBoard as their logs say."""

import json

import numpy as np
from cli_helpers import scalars

from solution import ensemble, soup
from solution.common import read_jsonl


def _values(folder) -> dict[str, list[float]]:
    return {tag: [v for _, v in events] for tag, events in scalars(folder / "tensorboard").items()}


def test_soup_and_ensemble_candidates_in_tensorboard(world, tmp_path):
    ckpts = [str(r / "checkpoints" / "best.pt") for r in world.runs]
    common = ["--val-data", str(world.lmdb("valid")), "--device", "cpu", "--report-to", "tensorboard"]
    soup.main(["--checkpoints", *ckpts, "--method", "greedy,uniform", "--output", str(tmp_path / "s"), *common])
    got = _values(tmp_path / "s")
    for method in ("greedy", "uniform"):
        rows = [r for r in read_jsonl(tmp_path / "s" / method / "soup_log.jsonl") if r["method"] != "ingredient"]
        want = [r["mean_recall"] for r in rows if r.get("mean_recall") is not None]
        assert want and got[f"{method}/mean_recall"] == [float(np.float32(v)) for v in want]
    out = tmp_path / "e"
    ensemble.main(["--members", *ckpts, "--output", str(out), "--rerank", "none,dual_softmax", *common])
    got, records = _values(out), read_jsonl(out / "ensemble_log.jsonl")
    assert set(got) == {f"{r['stage']}/score" for r in records} and "weights/score" in got
    weights = [float(np.float32(r["score"])) for r in records if r["stage"] == "weights"]
    assert got["weights/score"] == weights and json.loads((out / "ensemble.json").read_text())["weights"]
