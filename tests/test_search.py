"""Optuna search over training runs (solution.search).

Two layers: fast tests of the search machinery against a stand-in trainer that follows the
``solution.train.main(argv, on_validation=...)`` contract, and acceptance tests that run the real
trainer (tiny ViT-Tiny + RBT-Tiny, a few steps) on an LMDB of coloured squares.
"""

from __future__ import annotations

import json
import os
import re
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
from cli_helpers import one_error_line
from train_helpers import make_data

from solution import search as search_cli
from solution.common import SolutionError
from solution.formats.run_files import MetricsTail
from solution.soups.ingredients import study_checkpoints
from solution.studies.search_config import (
    check_trial_flags,
    flags_to_argv,
    load_config,
    parse_config,
    suggest_params,
    trial_flags,
)
from solution.studies.storage import ACCEPTED, make_storage, not_counted, worker_info
from solution.studies.study import run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- a stand-in trainer (the contract)

FAKE_TRAINER = textwrap.dedent("""
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
""")


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    ns: dict = {"__name__": "fake_trainer"}
    exec(compile(FAKE_TRAINER, str(path), "exec"), ns)
    return ns["main"], path


def wait_for(cond, proc: subprocess.Popen, seconds: float, what: str) -> None:
    """Poll ``cond`` while ``proc`` runs. A hang guard, not a speed check: past ``seconds`` the process
    is killed and the test fails."""
    deadline = time.monotonic() + seconds
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the process exited with code {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"hang guard: no {what} after {seconds:.0f} s; process killed")
        time.sleep(0.2)


def finish(proc: subprocess.Popen, seconds: float = 300) -> tuple[bytes, bytes]:
    """``proc.communicate()`` with a hang guard: past ``seconds`` the process is killed and the test fails."""
    try:
        return proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"hang guard: {proc.args} still running after {seconds:.0f} s; killed")


def fake_config(tmp_path, **study) -> dict:
    return {
        "name": "s",
        "out": str(tmp_path / "out"),
        "n_trials": 3,
        "plots": False,
        "pruner": {"name": "median", "n_startup_trials": 1},
        "sampler": {"name": "random", "seed": 0},
        "base": {"max-steps": 4, "valid-step-interval": 1},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}, "freeze-vision": [True, False]},
        **study,
    }


# ---------------------------------------------------------------- config and flags


def test_flags_from_base_and_params():
    cfg = parse_config(
        {
            "base": {"batch_size": 8, "--text-prompt": "商品：", "freeze-vision": False},
            "space": {
                "lr": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True},
                "text-prompt": [None, "图片："],
                "lora-rank": {"type": "categorical", "choices": [0, 8]},
                "lora-alpha": {"type": "int", "low": 8, "high": 32, "only_if": "lora-rank"},
                "tuning": {"choices": ["full", "frozen"], "sets": {"frozen": {"freeze_vision": True}}},
            },
        }
    )
    flags = trial_flags(cfg, {"lr": 1e-5, "text-prompt": None, "lora-rank": 0, "tuning": "frozen"})
    assert flags_to_argv(flags) == ["--batch-size", "8", "--freeze-vision", "--lr", "1e-05", "--lora-rank", "0"]
    study = optuna.create_study()
    for _ in range(6):  # lora-alpha exists exactly when lora-rank is on
        t = study.ask()
        params = suggest_params(t, cfg.space)
        assert ("lora-alpha" in params) == bool(params["lora-rank"])
        study.tell(t, 0.0)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"space": {"lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "log range needs low > 0"),
        ({"space": {"lr": {"type": "float", "low": 1, "high": 1}}}, "low must be below high"),
        ({"space": {"lr": {"type": "gaussian"}}}, "type must be one of"),
        ({"space": {"name": ["a", "b"]}}, "set by the search"),
        ({"space": {"wd": {"type": "int", "low": 1, "high": 3, "only_if": "lr"}}}, "not in the space"),
        ({"pruner": "sometimes"}, "pruner must be"),
        ({"bogus": 1}, "unknown keys"),
        ({"space": {"tuning": {"choices": ["a"], "sets": {"b": {"freeze-vision": True}}}}}, "not a choice"),
        ({"space": {"lr": [1e-4]}, "enqueue": [{"lrr": 1e-3}]}, r"enqueue\[0\] names 'lrr', which is not in the space"),
        ({"heartbeat": 10, "grace_period": 5}, "grace_period .* must exceed heartbeat"),
        ({"heartbeat": -1}, "heartbeat must be a non-negative integer"),
        ({"name": "../x"}, "name must be a plain folder name"),
    ],
)
def test_bad_config_is_one_clear_error(raw, message):
    with pytest.raises(SolutionError, match=message):
        parse_config(raw)


def test_shipped_configs_parse_and_the_trainer_accepts_their_trials():
    from solution.training.flags import parse_args

    for name in ("demo-cpu", "vit-b-16-gpu", "vit-h-14-gpu"):
        cfg = load_config(ROOT / "configs" / "search" / f"{name}.yaml")
        check_trial_flags(cfg)  # what the search checks before its first trial
        assert {"lr", "wd", "warmup", "batch-size"} <= set(cfg.space), name
        assert cfg.direction == "maximize" and cfg.n_trials > 0
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for params in cfg.enqueue:
            study.enqueue_trial(params)
        modes = set()
        for _ in range(12):  # every sampled trial is a valid train_clip.sh command line
            t = study.ask()
            args = parse_args(
                flags_to_argv({**trial_flags(cfg, suggest_params(t, cfg.space)), "logs": "/tmp/x", "name": "t"})
            )
            study.tell(t, 0.0)
            modes.add((args.lora_rank > 0, args.freeze_vision, args.freeze_text))
            assert args.lr == t.params["lr"] and args.batch_size == t.params["batch-size"]
        assert len(modes) >= 3, (name, modes)  # full, LoRA and frozen towers all get tried
    big = load_config(ROOT / "configs" / "search" / "vit-b-16-gpu.yaml").space
    assert (big["lr"].low, big["lr"].high, big["lr"].log) == (1e-6, 1e-4, True)
    assert (big["batch-size"].low, big["batch-size"].high) == (16, 360)
    assert None in big["text-prompt"].choices
    demo = load_config(ROOT / "configs" / "search" / "demo-cpu.yaml", ["device=cuda:1", "resume=", "max-steps=7"])
    argv = flags_to_argv(trial_flags(demo, demo.enqueue[0]))  # trial 0 of the demo: the default fine-tune
    assert "--resume" not in argv and argv[argv.index("--device") + 1] == "cuda:1"
    assert argv[argv.index("--max-steps") + 1] == "7" and "--lora-rank" not in argv and "--freeze-vision" not in argv


# ---------------------------------------------------------------- the machinery, stand-in trainer


@pytest.mark.filterwarnings("ignore:Fixed parameter")
def test_search_records_prunes_and_survives_failures(tmp_path, fake_train):
    main, _ = fake_train
    raw = fake_config(
        tmp_path,
        n_trials=4,
        plots="end",
        enqueue=[
            {"lr": 1e-2, "freeze-vision": True},  # learns: complete
            {"lr": 1e-4, "freeze-vision": False},  # slow: pruned
            {"lr": 0.9, "freeze-vision": False},
        ],
    )  # raises "OOM"
    cfg = parse_config(raw)
    summary = run_search(cfg, train_main=main)
    df = pd.read_csv(tmp_path / "out" / "s" / "trials.csv")
    assert summary["n_trials"] == 4 and summary["complete"] == (df["state"] == "COMPLETE").sum() >= 1
    assert list(df.columns[:4]) == ["number", "state", "value", "run_dir"]
    assert {"params_lr", "params_freeze-vision"} <= set(df.columns)
    states = dict(zip(df["number"], df["state"]))
    assert states[0] == "COMPLETE" and df.loc[0, "value"] == pytest.approx(100 * (1 - 2.718281828**-4), rel=1e-3)
    assert states[1] == "PRUNED" and df.loc[1, "pruned_at"] == 1
    assert states[2] == "FAIL" and df.loc[2, "fail_reason"].startswith("out of memory")
    for row in df.itertuples():
        assert Path(row.run_dir) == tmp_path / "out" / "s" / "trials" / f"{row.number:04d}"
        assert Path(row.run_dir, "metrics.jsonl").is_file() or row.state == "FAIL"
    for row in df[df["state"] == "COMPLETE"].itertuples():  # a trial's value: its best main-set validation
        records = [json.loads(x) for x in Path(row.run_dir, "metrics.jsonl").read_text().splitlines()]
        assert row.value == max(r["mean_recall"] for r in records if r["kind"] == "valid" and "set" not in r)
    complete = df[df["state"] == "COMPLETE"]
    top = complete.loc[complete["value"].idxmax()]  # best.json names the top row of trials.csv
    best = json.loads((tmp_path / "out" / "s" / "best.json").read_text())
    assert (best["number"], best["run_dir"]) == (top["number"], top["run_dir"])
    assert best["value"] == pytest.approx(top["value"]) == summary["best_value"]
    assert best["best_checkpoint"] == str(Path(top["run_dir"]) / "checkpoints" / "best.pt")
    command = (tmp_path / "out" / "s" / "best_command.sh").read_text()
    assert "bash Chinese-CLIP/train_clip.sh" in command and "--lr" in command and "--max-steps 4" in command
    assert os.access(tmp_path / "out" / "s" / "best_command.sh", os.X_OK)
    best_cfg = yaml.safe_load((tmp_path / "out" / "s" / "best_config.yaml").read_text())
    assert best_cfg["lr"] == pytest.approx(best["params"]["lr"]) and best_cfg["name"] == "s-best"
    for png in ("history", "intermediate", "parallel_coordinate"):
        assert (tmp_path / "out" / "s" / f"{png}.png").stat().st_size > 1000, png
    assert study_checkpoints(tmp_path / "out" / "s", 1) == [Path(best["run_dir"]) / "checkpoints" / "best.pt"]


def test_metrics_tail_reads_whole_lines_and_skips_a_torn_last_one(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read_new() == []  # not written yet
    path.write_text('{"step": 1}\n{"step": 2')
    assert tail.read_new() == [{"step": 1}]  # the second line is still being written
    with open(path, "a") as f:
        f.write('}\n{"step": 3}\n{"step": ')
    assert tail.read_new() == [{"step": 2}, {"step": 3}]
    assert tail.read_new(final=True) == [] and "metrics.jsonl:4: skipping a last line torn by a kill" in caplog.text
    path.write_text('{"step": 1}\n[2]\n{"step": 3}\n')
    with pytest.raises(SolutionError, match="metrics.jsonl:2: record 2 is a list, not a JSON object"):
        MetricsTail(path).read_new()


def test_argparse_exit_and_nan_are_failures_not_crashes(tmp_path, fake_train):
    main, _ = fake_train
    raw = fake_config(
        tmp_path, n_trials=2, pruner="none", enqueue=[{"lr": 1e-3}], base={"max-steps": 2, "not-a-flag": 3}
    )
    summary = run_search(parse_config(raw), train_main=main)
    assert summary["fail"] == 2 and summary["complete"] == 0
    reasons = pd.read_csv(tmp_path / "out" / "s" / "trials.csv")["fail_reason"]
    assert all("exited with code 2" in r for r in reasons)

    def nan_train(argv, on_validation=None):
        on_validation({"step": 1, "epoch": 0, "kind": "valid", "mean_recall": float("nan")})

    summary = run_search(parse_config({**raw, "name": "nan", "n_trials": 1}), train_main=nan_train)
    assert summary["fail"] == 1
    assert "nan" in pd.read_csv(tmp_path / "out" / "nan" / "trials.csv")["fail_reason"][0]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test plays a dead worker with study.ask()
@pytest.mark.parametrize("storage", ["sqlite", "journal"])  # failed by heartbeat / by process check
def test_resume_counts_toward_total_and_recovers_dead_worker(tmp_path, fake_train, storage):
    main, _ = fake_train
    journal = {"storage": f"journal:{tmp_path / 'j.log'}"} if storage == "journal" else {}
    cfg = parse_config(fake_config(tmp_path, n_trials=2, pruner="none", heartbeat=1, grace_period=2, **journal))
    run_search(cfg, train_main=main)
    # a worker that died mid-trial: RUNNING in storage, owned by a pid that no longer exists
    study = optuna.load_study(study_name="s", storage=make_storage(cfg))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    t.set_user_attr("worker", {"host": worker_info()["host"], "pid": dead.pid, "started": None})
    if storage == "sqlite":
        study._storage.record_heartbeat(t._trial_id)  # its last heartbeat; the search fails it 2 s later
    study.ask()  # a trial killed before it got its worker attribute (and heartbeat): not counted, left alone
    cfg.n_trials = 3
    summary = run_search(cfg, train_main=main)
    trials = optuna.load_study(study_name="s", storage=make_storage(cfg)).trials
    assert [tr.number for tr in trials] == [0, 1, 2, 3, 4]  # grew; nothing restarted
    assert trials[2].state.name == "FAIL" and not_counted(trials[2])
    assert trials[3].state.name == "RUNNING"
    assert trials[4].user_attrs["retry_of"] == 2 and trials[4].params["lr"] == t.params["lr"]
    assert summary["complete"] == 3
    assert run_search(cfg, train_main=main)["n_trials"] == 5  # target met: nothing more runs


def test_subprocess_mode_tails_metrics_and_kills_pruned_child(tmp_path, fake_train):
    _, script = fake_train
    raw = fake_config(
        tmp_path,
        n_trials=2,
        mode="subprocess",
        launcher=[sys.executable, str(script)],
        base={"max-steps": 40, "valid-step-interval": 1, "sleep": 0.05},
        enqueue=[{"lr": 1e-2, "freeze-vision": True}, {"lr": 1e-4, "freeze-vision": True}],
    )
    summary = run_search(parse_config(raw), train_main=None)
    df = pd.read_csv(tmp_path / "out" / "s" / "trials.csv")
    assert list(df["state"]) == ["COMPLETE", "PRUNED"], summary
    assert df.loc[0, "value"] == pytest.approx(100 * (1 - 2.718281828**-40), rel=1e-3)
    pruned_lines = (Path(df.loc[1, "run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert len(pruned_lines) < 2 * 40  # the child was stopped early


def test_two_cli_workers_share_a_journal_study(tmp_path, fake_train):
    """Journal storage (many machines, NFS) with subprocess trials: two CLI workers, one study."""
    _, script = fake_train
    raw = fake_config(
        tmp_path,
        n_trials=6,
        mode="subprocess",
        launcher=[sys.executable, str(script)],
        pruner="none",
        sampler={"name": "random"},
        storage=f"journal:{tmp_path / 'shared' / 'j.log'}",
        base={"max-steps": 3, "valid-step-interval": 1, "sleep": 0.2},
    )
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "solution.search", "--config", str(tmp_path / "s.yaml")]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [finish(w) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs[0][1].decode()[-2000:]
    storage = make_storage(parse_config(raw))
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.number for t in trials] == list(range(len(trials))) and 6 <= len(trials) <= 7
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)


def test_sigterm_stops_the_child_and_requeues_the_trial(tmp_path, fake_train):
    _, script = fake_train
    raw = fake_config(
        tmp_path,
        n_trials=2,
        mode="subprocess",
        launcher=[sys.executable, str(script)],
        pruner="none",
        base={"max-steps": 40, "valid-step-interval": 1, "sleep": 0.25},
    )
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "solution.search", "--config", str(tmp_path / "s.yaml")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    metrics = tmp_path / "out" / "s" / "trials" / "0000" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.stat().st_size, proc, 120, "a validation of trial 0")
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    assert proc.returncode == 130
    size = metrics.stat().st_size
    time.sleep(0.8)
    assert metrics.stat().st_size == size  # the child was stopped with its parent
    t0, t1 = optuna.load_study(study_name="s", storage=make_storage(parse_config(raw))).trials
    assert t0.state.name == "FAIL" and t0.user_attrs["interrupted"]
    assert t1.state.name == "WAITING" and t1.user_attrs["retry_of"] == 0
    raw["base"]["sleep"] = 0.0
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    again = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finish(again)
    assert again.returncode == 0
    trials = optuna.load_study(study_name="s", storage=make_storage(parse_config(raw))).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == t0.params


# ---------------------------------------------------------------- refusals: one line, before any trial


def run_cli_search(*args, trials_run: bool = False) -> tuple[int, str, list[str]]:
    """``python -m solution.search ARGS``: exit code, stdout, and the ``error:`` lines of stderr, the
    last of which ends it (Optuna logs the traceback of a failed trial; nothing else may)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "solution.search", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = finish(proc)
    lines = err.decode().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert trials_run or "Traceback" not in err.decode(), err.decode()[-3000:]
    assert not errors or lines[-1] == errors[-1], lines[-5:]
    return proc.returncode, out.decode(), errors


def real_trainer_config(tmp_path, **changes) -> Path:
    """A search of the real trainer (no launcher) whose trials would fail at once: no LMDB there."""
    raw = {
        "name": "s",
        "out": str(tmp_path / "out"),
        "n_trials": 2,
        "plots": False,
        "sampler": "random",
        "base": {"train-data": str(tmp_path / "no-lmdb"), "device": "cpu", "max-steps": 2},
        "space": {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}, "augment": ["none", "gentle"]},
    }
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "changes, sets, message",
    [
        ({}, ["lrr=1e-4"], r"--set lrr=1e-4: --lrr is not a flag of solution.train \(did you mean --lr\?\)"),
        ({"base": {"batch_sise": 8}}, [], r"base key 'batch-sise': --batch-sise is not a flag .*--batch-size"),
        (
            {"space": {"augment": ["none", "strong"]}},
            [],
            r"space entry 'augment' = 'strong' cannot start: "
            r"argument --augment: invalid choice: 'strong'",
        ),
        ({}, ["lora-rank=true"], r"the first trial cannot start: argument --lora-rank: expected one argument"),
        ({}, ["max-steps=many"], r"argument --max-steps: invalid int value: 'many'"),
        (
            {"space": {"warmup": {"type": "int", "low": -5, "high": 10}}},
            [],
            r"the first trial cannot start: .*--warmup -5",
        ),  # the trainer's own range check, at the range's low end
        (
            {"space": {"lora-dropout": {"type": "float", "low": 0.0, "high": 1.5}}},
            [],
            r"space entry 'lora-dropout' = 1.5 cannot start: .*--lora-dropout 1.5",
        ),  # ... and at its high end
        (
            {"space": {"tune": {"choices": ["a", "b"], "sets": {"b": {"freeze-visoin": True}}}}},
            [],
            r"space entry 'tune', sets.b: --freeze-visoin is not a flag",
        ),
    ],
)
def test_a_config_that_cannot_start_a_trial_is_refused_before_the_first(
    tmp_path, capsys, monkeypatch, changes, sets, message
):
    config = real_trainer_config(tmp_path, **changes)  # in-process (run_cli, as the shell wrapper): one error line
    rc, error = one_error_line(
        capsys, monkeypatch, search_cli.main, ["--config", str(config), *[a for kv in sets for a in ("--set", kv)]]
    )
    assert rc == 2
    assert error.startswith(f"error: {config}: ") and re.search(message, error), error
    assert not (tmp_path / "out").exists()  # refused before the study was created


def test_a_search_in_which_no_trial_completes_exits_non_zero(tmp_path, fake_train):
    _, script = fake_train
    raw = fake_config(
        tmp_path,
        n_trials=2,
        mode="subprocess",
        launcher=[sys.executable, str(script)],
        space={"lr": {"type": "float", "low": 0.5, "high": 0.9}},
    )  # the stand-in runs out of memory
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    rc, out, errors = run_cli_search("--config", tmp_path / "s.yaml", trials_run=True)
    assert rc == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: study 's' completed no trial (2 failed, 0 pruned; first failure: trial 0: ")
    assert "out of memory" in errors[0] and errors[0].endswith(f"see {tmp_path / 'out' / 's' / 'trials.csv'}")
    assert json.loads(out.strip().splitlines()[-1])["fail"] == 2  # the summary is still printed
    raw["space"]["lr"] = {"type": "float", "low": 1e-3, "high": 1e-2}  # one trial more, and it completes
    raw["n_trials"] = 3
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert run_cli_search("--config", tmp_path / "s.yaml", trials_run=True)[0] == 0


@pytest.mark.parametrize("out", ["missing", None, ""])
def test_a_config_without_out_keeps_its_study_under_runs_search(tmp_path, fake_train, monkeypatch, caplog, out):
    main, _ = fake_train
    raw = fake_config(tmp_path, n_trials=1)
    if out == "missing":
        del raw["out"]
    else:
        raw["out"] = out
    monkeypatch.chdir(tmp_path)
    run_search(parse_config(raw, "s.yaml"), train_main=main)
    assert (tmp_path / "runs" / "search" / "s" / "trials.csv").is_file()
    assert (tmp_path / "runs" / "search" / "s" / "trials" / "0000" / "metrics.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake_trainer.py", "runs"]  # nothing else in the cwd
    assert "s.yaml gives no out: the study folder is runs/search/s" in caplog.text


@pytest.mark.parametrize(
    "url, message",
    [
        ("foo://bar", "unknown scheme 'foo'"),
        ("postgres://me@localhost/optuna", "unknown scheme 'postgres'"),  # postgresql:// is the name
        ("study.db", "not a URL"),
        (
            "postgresql://me:secret@127.0.0.1:1/optuna",  # nothing listens on port 1
            r"cannot open storage 'postgresql://me:\*\*\*@127.0.0.1:1/optuna': .*refused",
        ),
    ],
)
def test_storage_url_errors_are_one_line(tmp_path, url, message):
    config = real_trainer_config(tmp_path)
    with pytest.raises(SolutionError, match=message) as e:
        search_cli.main(["--config", str(config), "--storage", url])
    text = str(e.value)
    assert "\n" not in text and "secret" not in text
    if "cannot open" not in message:
        assert all(s in text for s in ("sqlite:///", "postgresql://", "mysql://", "journal:PATH")), text
    assert not (tmp_path / "out").exists()


def test_unknown_storage_scheme_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    rc, error = one_error_line(
        capsys, monkeypatch, search_cli.main, ["--config", str(real_trainer_config(tmp_path)), "--storage", "foo://bar"]
    )
    assert rc == 2 and error == f"error: storage 'foo://bar': unknown scheme 'foo'; accepted: {ACCEPTED}"


# ---------------------------------------------------------------- acceptance: the real trainer

TINY = {
    "vision-model": "ViT-Tiny",
    "text-model": "RBT-Tiny",
    "context-length": 16,
    "valid-batch-size": 32,
    "num-workers": 0,
    "valid-num-workers": 0,
    "precision": "fp32",
    "device": "cpu",
    "no-progress": True,
    "no-plot": True,
    "valid-epoch-interval": 0,
    "save-epoch-frequency": 0,
    "log-interval": 2,
}


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """Coloured squares with colour-name texts, and a base model trained on them (the demo's 'pretrained')."""
    from solution.training import trainer as train

    root = tmp_path_factory.mktemp("squares")
    tr, va = make_data(root)  # the trainer tests' coloured squares: 6 train / 3 valid images per colour
    base = train.main(
        flags_to_argv(
            {
                **TINY,
                "train-data": tr,
                "val-data": va,
                "logs": root / "runs",
                "name": "base",
                "batch-size": 16,
                "max-steps": 20,
                "valid-step-interval": 20,
                "lr": 4e-3,
                "warmup": 2,
                "wd": 0.01,
            }
        )
    )
    assert base["best"]["mean_recall"] > 50, base["best"]  # it learned: fine-tunes have something to keep
    return tr, va, Path(base["best_checkpoint"]), base["best"]["mean_recall"]


def real_config(squares, out: Path, **study) -> dict:
    tr, va, base, _ = squares
    return {
        "name": "real",
        "out": str(out),
        "n_trials": 3,
        "plots": "end",
        "sampler": {"name": "random"},
        "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        "base": {
            **TINY,
            "train-data": str(tr),
            "val-data": str(va),
            "resume": str(base),
            "reset-optimizer": True,
            "reset-data-offset": True,
            "batch-size": 16,
            "max-steps": 4,
            "valid-step-interval": 2,
            "warmup": 0,
        },
        "space": {
            "lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
            "wd": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
            "batch-size": [16, 4096],
        },
        **study,
    }


@pytest.mark.filterwarnings("ignore:Fixed parameter")  # the diverging lr lies outside the sampled range
def test_real_search_completes_prunes_diverging_lr_and_survives_a_raising_trial(tmp_path, squares):
    base_recall = squares[3]
    raw = real_config(
        squares,
        tmp_path,
        enqueue=[
            {"lr": 1e-4, "wd": 0.01, "batch-size": 16},  # a sane fine-tune: keeps the base's recall
            {"lr": 0.05, "wd": 0.01, "batch-size": 16},  # diverges: far below the median at the first validation
            {"lr": 1e-4, "wd": 0.01, "batch-size": 4096},  # the trainer raises: batch larger than the data
        ],
    )
    summary = run_search(parse_config(raw))
    assert (summary["n_trials"], summary["complete"], summary["pruned"], summary["fail"]) == (3, 1, 1, 1), summary
    df = pd.read_csv(tmp_path / "real" / "trials.csv")
    assert list(df["state"]) == ["COMPLETE", "PRUNED", "FAIL"]
    assert df.loc[0, "value"] >= base_recall - 10
    assert df.loc[1, "pruned_at"] == 2 and df.loc[1, "value"] < df.loc[0, "value"]
    assert "larger than" in df.loc[2, "fail_reason"]
    run0 = Path(df.loc[0, "run_dir"])
    valid = [r for r in map(json.loads, (run0 / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [2, 4] and max(r["mean_recall"] for r in valid) == df.loc[0, "value"]
    assert (run0 / "checkpoints" / "best.pt").is_file()
    command = (tmp_path / "real" / "best_command.sh").read_text()
    assert f"--resume {squares[2]}" in command and "--lr 0.0001" in command and "--name real-best" in command
    from solution.training.flags import parse_args

    again = parse_args(["--config", str(tmp_path / "real" / "best_config.yaml")])  # train_clip.sh --config
    assert (again.lr, again.resume, again.name, again.max_steps) == (1e-4, str(squares[2]), "real-best", 4)
    assert study_checkpoints(tmp_path / "real", 3) == [run0 / "checkpoints" / "best.pt"]  # model_soup --from-study
    assert (tmp_path / "real" / "history.png").stat().st_size > 1000


def _csv_states(path: Path) -> list[str]:
    try:
        return list(pd.read_csv(path)["state"])
    except (FileNotFoundError, pd.errors.EmptyDataError, KeyError):
        return []


def test_cli_resumes_after_kill_and_two_workers_share_the_study(tmp_path, squares):
    # 6 trials: enough left after the kill that both workers get some even if one starts seconds late
    raw = real_config(squares, tmp_path, n_trials=6, pruner="none", heartbeat=1, grace_period=10)
    raw["space"]["batch-size"] = [16]
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    cmd = [sys.executable, "-m", "solution.search", "--config", str(cfg_path), "--no-plots"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(tmp_path / "first.log", "w"), env=env)
    wait_for(lambda: "COMPLETE" in _csv_states(tmp_path / "real" / "trials.csv"), first, 300, "a complete trial")
    first.send_signal(signal.SIGKILL)
    first.wait()
    storage = f"sqlite:///{tmp_path / 'real' / 'study.db'}"
    before = optuna.load_study(study_name="real", storage=storage).trials
    assert before[0].state.name == "COMPLETE"

    workers = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(tmp_path / f"w{i}.log", "w"), env=env)
        for i in range(2)
    ]
    for i, w in enumerate(workers):
        out, _ = finish(w)
        assert w.returncode == 0, (tmp_path / f"w{i}.log").read_text()[-2000:]
        assert json.loads(out.decode().strip().splitlines()[-1])["study"] == "real"

    trials = optuna.load_study(study_name="real", storage=storage).trials
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(numbers)))  # no duplicated trial numbers
    assert trials[0].datetime_start == before[0].datetime_start and trials[0].value == before[0].value  # kept
    started = [t for t in trials if "worker" in t.user_attrs]  # (a kill at birth leaves a bare RUNNING trial)
    real = [t for t in started if not not_counted(t)]
    assert all(t.state.name == "COMPLETE" for t in real)
    assert not [t.number for t in started if t.state.name == "RUNNING"]  # the killed one was failed and re-run
    assert 6 <= len(real) <= 7  # the target; a race between two workers may add at most one
    assert len({t.user_attrs["run_dir"] for t in started}) == len(started)
    assert len({t.user_attrs["worker"]["pid"] for t in trials[len(before) :]}) == 2  # both workers ran trials
    assert all(t.state.name == "FAIL" for t in trials if not_counted(t))
    for t in real:
        lines = (Path(t.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "valid"] == [2, 4]
    df = pd.read_csv(tmp_path / "real" / "trials.csv")
    assert len(df) == len(trials)
