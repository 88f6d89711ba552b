"""Optuna search over training runs (solution.search).

Two layers: fast tests of the search machinery against a stand-in trainer that follows the
``solution.train.main(argv, on_validation=...)`` contract, and acceptance tests that run the real
trainer (tiny ViT-Tiny + RBT-Tiny, a few steps) on an LMDB of coloured squares.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from PIL import Image

from solution import search
from solution.common import SolutionError, append_jsonl
from solution.lmdb_io import write_split
from solution.search_config import flags_to_argv, load_config, parse_config, trial_flags

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- a stand-in trainer (the contract)

FAKE_TRAINER = textwrap.dedent('''
    import argparse, json, math, os, sys
    from pathlib import Path

    def main(argv=None, on_validation=None):
        p = argparse.ArgumentParser()
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--wd", type=float, default=0.0)
        p.add_argument("--logs", required=True)
        p.add_argument("--name", required=True)
        p.add_argument("--max-steps", type=int, default=4)
        p.add_argument("--valid-step-interval", type=int, default=1)
        p.add_argument("--freeze-vision", action="store_true")
        p.add_argument("--text-prompt", default="")
        p.add_argument("--sleep", type=float, default=0.0)
        args = p.parse_args(argv)
        run = Path(args.logs) / args.name
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        if args.lr >= 0.5:
            raise RuntimeError("CUDA out of memory (stand-in)")
        best = None
        for step in range(1, args.max_steps + 1):
            if args.sleep:
                import time; time.sleep(args.sleep)
            recall = 100 * (1 - math.exp(-step * args.lr * 100)) if args.lr < 0.1 else 1.0
            rec = {"step": step, "epoch": 0, "kind": "valid", "r1": recall, "r5": recall, "r10": recall,
                   "mean_recall": recall, "val_loss": 1.0}
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\\n")
                f.write(json.dumps({**rec, "set": "general", "mean_recall": 0.0}) + "\\n")
            if best is None or recall > best["mean_recall"]:
                best = rec
                (run / "checkpoints" / "best.pt").write_bytes(b"x")
            if on_validation is not None:
                on_validation(rec)
        return {"run_dir": str(run), "best": best, "best_checkpoint": str(run / "checkpoints" / "best.pt"),
                "last_checkpoint": None, "params": vars(args)}

    if __name__ == "__main__":
        main()
''')


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    ns: dict = {"__name__": "fake_trainer"}
    exec(compile(FAKE_TRAINER, str(path), "exec"), ns)
    return ns["main"], path


def fake_config(tmp_path, **study) -> dict:
    return {"name": "s", "out": str(tmp_path / "out"), "n_trials": 3, "plots": "end",
            "pruner": {"name": "median", "n_startup_trials": 1}, "sampler": {"name": "random", "seed": 0},
            "base": {"max-steps": 4, "valid-step-interval": 1},
            "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                      "freeze-vision": [True, False]},
            **study}


# ---------------------------------------------------------------- config and flags


def test_flags_from_base_and_params():
    cfg = parse_config({"base": {"batch_size": 8, "--text-prompt": "商品：", "freeze-vision": False},
                        "space": {"lr": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True},
                                  "text-prompt": [None, "图片："],
                                  "lora-rank": {"type": "categorical", "choices": [0, 8]},
                                  "lora-alpha": {"type": "int", "low": 8, "high": 32, "only_if": "lora-rank"},
                                  "tuning": {"choices": ["full", "frozen"], "sets": {"frozen": {"freeze_vision": True}}}}})
    flags = trial_flags(cfg, {"lr": 1e-5, "text-prompt": None, "lora-rank": 0, "tuning": "frozen"})
    assert flags_to_argv(flags) == ["--batch-size", "8", "--freeze-vision", "--lr", "1e-05", "--lora-rank", "0"]
    study = optuna.create_study()
    for _ in range(6):  # lora-alpha exists exactly when lora-rank is on
        t = study.ask()
        params = search.suggest_params(t, cfg.space)
        assert ("lora-alpha" in params) == bool(params["lora-rank"])
        study.tell(t, 0.0)


@pytest.mark.parametrize("raw, message", [
    ({"space": {"lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "log range needs low > 0"),
    ({"space": {"lr": {"type": "float", "low": 1, "high": 1}}}, "low must be below high"),
    ({"space": {"lr": {"type": "gaussian"}}}, "type must be one of"),
    ({"space": {"name": ["a", "b"]}}, "set by the search"),
    ({"space": {"wd": {"type": "int", "low": 1, "high": 3, "only_if": "lr"}}}, "not in the space"),
    ({"pruner": "sometimes"}, "pruner must be"),
    ({"bogus": 1}, "unknown keys"),
])
def test_bad_config_is_one_clear_error(raw, message):
    with pytest.raises(SolutionError, match=message):
        parse_config(raw)


def test_shipped_configs_parse():
    for name in ("demo-cpu", "vit-b-16-gpu", "vit-h-14-gpu"):
        cfg = load_config(ROOT / "configs" / "search" / f"{name}.yaml")
        assert {"lr", "wd", "warmup", "batch-size"} <= set(cfg.space), name
        assert cfg.direction == "maximize" and cfg.n_trials > 0
    big = load_config(ROOT / "configs" / "search" / "vit-b-16-gpu.yaml").space
    assert (big["lr"].low, big["lr"].high, big["lr"].log) == (1e-6, 1e-4, True)
    assert (big["batch-size"].low, big["batch-size"].high) == (16, 360)
    assert None in big["text-prompt"].choices


# ---------------------------------------------------------------- the machinery, stand-in trainer


def test_search_records_prunes_and_survives_failures(tmp_path, fake_train):
    main, _ = fake_train
    raw = fake_config(tmp_path, n_trials=4, enqueue=[{"lr": 1e-2, "freeze-vision": True},  # learns: complete
                                                      {"lr": 1e-4, "freeze-vision": False},  # slow: pruned
                                                      {"lr": 0.9, "freeze-vision": False}])  # raises "OOM"
    cfg = parse_config(raw)
    summary = search.run_search(cfg, train_main=main)
    assert summary["n_trials"] == 4 and summary["complete"] >= 1
    df = pd.read_csv(tmp_path / "out" / "s" / "trials.csv")
    assert list(df.columns[:4]) == ["number", "state", "value", "run_dir"]
    assert {"params_lr", "params_freeze-vision"} <= set(df.columns)
    states = dict(zip(df["number"], df["state"]))
    assert states[0] == "COMPLETE" and df.loc[0, "value"] == pytest.approx(100 * (1 - 2.718281828 ** -4), rel=1e-3)
    assert states[1] == "PRUNED" and df.loc[1, "pruned_at"] == 1
    assert states[2] == "FAIL" and df.loc[2, "fail_reason"].startswith("out of memory")
    for row in df.itertuples():
        assert Path(row.run_dir) == tmp_path / "out" / "s" / "trials" / f"{row.number:04d}"
        assert Path(row.run_dir, "metrics.jsonl").is_file() or row.state == "FAIL"
    best = json.loads((tmp_path / "out" / "s" / "best.json").read_text())
    assert best["number"] == 0 or best["value"] >= df.loc[0, "value"]
    command = (tmp_path / "out" / "s" / "best_command.sh").read_text()
    assert "bash Chinese-CLIP/train_clip.sh" in command and "--lr" in command and "--max-steps 4" in command
    assert os.access(tmp_path / "out" / "s" / "best_command.sh", os.X_OK)
    best_cfg = yaml.safe_load((tmp_path / "out" / "s" / "best_config.yaml").read_text())
    assert best_cfg["lr"] == pytest.approx(best["params"]["lr"]) and best_cfg["name"] == "s-best"
    for png in ("history", "intermediate", "parallel_coordinate"):
        assert (tmp_path / "out" / "s" / f"{png}.png").stat().st_size > 1000, png
    assert search.top_checkpoints(tmp_path / "out" / "s", 1) == [Path(best["run_dir"]) / "checkpoints" / "best.pt"]


def test_argparse_exit_and_nan_are_failures_not_crashes(tmp_path, fake_train):
    main, _ = fake_train
    raw = fake_config(tmp_path, n_trials=2, pruner="none", enqueue=[{"lr": 1e-3}],
                      base={"max-steps": 2, "not-a-flag": 3})
    summary = search.run_search(parse_config(raw), train_main=main)
    assert summary["fail"] == 2 and summary["complete"] == 0
    reasons = pd.read_csv(tmp_path / "out" / "s" / "trials.csv")["fail_reason"]
    assert all("exited with code 2" in r for r in reasons)

    def nan_train(argv, on_validation=None):
        on_validation({"step": 1, "epoch": 0, "kind": "valid", "mean_recall": float("nan")})

    summary = search.run_search(parse_config({**raw, "name": "nan", "n_trials": 1}), train_main=nan_train)
    assert summary["fail"] == 1
    assert "nan" in pd.read_csv(tmp_path / "out" / "nan" / "trials.csv")["fail_reason"][0]


def test_resume_counts_toward_total_and_recovers_dead_worker(tmp_path, fake_train):
    main, _ = fake_train
    cfg = parse_config(fake_config(tmp_path, n_trials=2, pruner="none"))
    search.run_search(cfg, train_main=main)
    # a worker that died mid-trial: RUNNING in storage, owned by a pid that no longer exists
    study = optuna.load_study(study_name="s", storage=search.make_storage(cfg))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    for k, v in (("host", os.uname().nodename), ("pid", dead.pid), ("pid_started", None)):
        t.set_user_attr(k, v)
    cfg.n_trials = 3
    summary = search.run_search(cfg, train_main=main)
    trials = optuna.load_study(study_name="s", storage=search.make_storage(cfg)).trials
    assert [tr.number for tr in trials] == [0, 1, 2, 3]  # grew; nothing restarted
    assert trials[2].state.name == "FAIL" and trials[2].user_attrs["interrupted"]
    assert trials[3].user_attrs["retry_of"] == 2 and trials[3].params["lr"] == t.params["lr"]
    assert summary["complete"] == 3
    assert search.run_search(cfg, train_main=main)["n_trials"] == 4  # target met: nothing more runs


def test_subprocess_mode_tails_metrics_and_kills_pruned_child(tmp_path, fake_train):
    _, script = fake_train
    raw = fake_config(tmp_path, n_trials=2, mode="subprocess", launcher=[sys.executable, str(script)],
                      base={"max-steps": 40, "valid-step-interval": 1, "sleep": 0.05},
                      enqueue=[{"lr": 1e-2, "freeze-vision": True}, {"lr": 1e-4, "freeze-vision": True}])
    t0 = time.time()
    summary = search.run_search(parse_config(raw), train_main=None)
    df = pd.read_csv(tmp_path / "out" / "s" / "trials.csv")
    assert list(df["state"]) == ["COMPLETE", "PRUNED"], summary
    assert df.loc[0, "value"] == pytest.approx(100 * (1 - 2.718281828 ** -40), rel=1e-3)
    pruned_lines = (Path(df.loc[1, "run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert len(pruned_lines) < 2 * 40  # the child was stopped early
    assert time.time() - t0 < 30
