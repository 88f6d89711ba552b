"""Optuna search (solution.search) with a stand-in trainer (in process or a child) and the real one on the world."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from cli_helpers import one_error_line, scalars
from train_helpers import metrics

from solution import common
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
from solution.studies.storage import ACCEPTED, DIED, make_storage, not_counted, worker_info
from solution.studies.study import run_search
from solution.training.flags import parse_args

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]

FAKE_TRAINER = textwrap.dedent("""
    import argparse, json, math, os, signal, time
    from pathlib import Path

    def main(argv=None, on_validation=None):
        p = argparse.ArgumentParser()
        for flag, kind, default in (("--lr", float, 1e-3), ("--max-steps", int, 4), ("--sleep", float, 0.0)):
            p.add_argument(flag, type=kind, default=default)
        p.add_argument("--logs", required=True)
        p.add_argument("--name", required=True)
        p.add_argument("--freeze-vision", action="store_true")
        p.add_argument("--term-parent", action="store_true")  # SIGTERM to the search after the first validation
        args = p.parse_args(argv)
        run = Path(args.logs) / args.name
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        if args.lr >= 0.5:
            raise RuntimeError("CUDA out of memory (stand-in)")
        for step in range(1, args.max_steps + 1):
            time.sleep(args.sleep)
            recall = 100 * (1 - math.exp(-step * args.lr * 100)) if args.lr < 0.1 else 1.0
            recall = math.nan if args.lr == 0.2 else recall
            rec = dict(step=step, epoch=0, kind="valid", **dict.fromkeys(("r1", "r5", "r10", "mean_recall"), recall))
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\\n" + json.dumps({**rec, "set": "general", "mean_recall": 0.0}) + "\\n")
            (run / "checkpoints" / "best.pt").write_bytes(b"x")
            if on_validation is not None:
                on_validation(rec)
            if args.term_parent and step == 1:
                os.kill(os.getppid(), signal.SIGTERM)

    if __name__ == "__main__":
        main()
""")


# A search worker without the CLI's model registry (and torch): for the tests that kill one
WORKER = "import sys; from solution.studies.search_config import load_config as c; from solution.studies.study "
WORKER = [sys.executable, "-c", WORKER + "import run_search; run_search(c(sys.argv[1]))"]


@pytest.fixture
def fake_train(tmp_path):
    """``(main, path)``: the stand-in trainer in this process, and as a script for child processes."""
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    ns: dict = {}
    exec(compile(FAKE_TRAINER, str(path), "exec"), ns)
    return ns["main"], path


def wait_for(cond, proc: subprocess.Popen, seconds: float, what: str) -> None:
    """Poll ``cond`` while ``proc`` runs; a hang guard, not a speed check (past ``seconds``: killed, failed)."""
    deadline = time.monotonic() + seconds
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the process exited with code {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"hang guard: no {what} after {seconds:.0f} s; process killed")
        time.sleep(0.2)


def fake_config(tmp_path, **study) -> dict:
    """A study of the stand-in trainer in a journal file (an RDB, the default SQLite included: where it matters)."""
    return {
        "name": "s",
        "storage": f"journal:{tmp_path / 'study.log'}",
        "out": str(tmp_path / "out"),
        "n_trials": 3,
        "plots": False,
        "pruner": {"name": "median", "n_startup_trials": 1},
        "sampler": {"name": "random", "seed": 0},
        "base": {"max-steps": 4},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}, "freeze-vision": [True, False]},
        **study,
    }


def child_config(tmp_path, script, **study) -> dict:
    """Trials as child processes of the stand-in trainer."""
    return fake_config(
        tmp_path, **{"mode": "subprocess", "launcher": [sys.executable, str(script)], "pruner": "none", **study}
    )


def _trials(raw: dict) -> list:
    return optuna.load_study(study_name=raw["name"], storage=make_storage(parse_config(raw))).trials


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
    assert flags_to_argv({"a": [1, 2], "b": False}) == ["--a", "1", "2"]
    argv = flags_to_argv({"same-text-positives": False, "freeze-vision": False})  # on / off by default
    assert (
        argv == ["--no-same-text-positives"] and parse_args([*argv, "--train-data", "t"]).same_text_positives is False
    )
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
        ({"space": {"lr": {"type": "float", "low": "a", "high": 1}}}, "float needs numeric low and high"),
        ({"space": {"lr": {"type": "gaussian"}}}, "type must be one of"),
        ({"space": {"lr": {"choices": [1], "stride": 2}}}, r"unknown keys \['stride'\]"),
        ({"space": {"lr": {"choices": []}}}, "categorical needs a non-empty choices list"),
        ({"space": {"name": ["a", "b"]}}, "set by the search"),
        ({"space": {"wd": {"type": "int", "low": 1, "high": 3, "only_if": "lr"}}}, "not in the space"),
        ({"space": {"tuning": {"choices": ["a"], "sets": {"b": {"freeze-vision": True}}}}}, "not a choice"),
        ({"space": {"lr": [1e-4]}, "enqueue": [{"lrr": 1e-3}]}, r"enqueue\[0\] names 'lrr', which is not in the space"),
        ({"pruner": "sometimes"}, "pruner must be one of median, hyperband, none"),
        ({"sampler": {"seed": 1}}, "sampler must be a name or a mapping with a 'name' key"),
        ({"bogus": 1}, r"unknown keys \['bogus'\]"),
        ({"heartbeat": 10, "grace_period": 5}, "grace_period .* must exceed heartbeat"),
        ({"heartbeat": -1}, "heartbeat must be an integer >= 0"),
        ({"grace_period": 0}, "grace_period must be an integer >= 1"),
        ({"n_trials": True}, "n_trials must be an integer >= 0"),
        ({"direction": "up"}, "direction must be one of maximize"),
        ({"plots": "sometimes"}, "plots must be one of each, end"),
        ({"timeout": True}, "timeout must be a positive number of seconds"),
        ({"timeout": float("nan")}, "timeout must be a positive number of seconds"),
        ({"space": {"lr": {"type": "float", "low": 0.1, "high": 1, "step": 0}}}, "step must be a positive number"),
        ({"space": {"lr": {"type": "float", "low": 0.1, "high": float("inf")}}}, r"below high \(both finite"),
        ({"launcher": "bash"}, "launcher must be a non-empty list"),
        ({"name": "../x"}, "name must be a plain folder name"),
        ({"gpus_per_trial": 2}, "gpus_per_trial 2 needs mode: subprocess"),
        ({"gpus_per_trial": -1}, "gpus_per_trial must be an integer >= 0"),
        ({"gpus_per_trial": 1, "gpus": "0,0"}, "GPU 0 is named twice"),
        ({"gpus_per_trial": 1, "gpus": "0,a b"}, "'a b' is not a GPU id"),
        ({"gpus_per_trial": 1, "base": {"device": "cpu"}}, "gpus_per_trial 1 with device cpu"),
        ({"gpus_per_trial": 1, "mode": "subprocess", "base": {"device": "cuda:1"}}, "device cuda:1 names one GPU"),
    ],
)
def test_bad_config_is_one_clear_error(raw, message):
    with pytest.raises(SolutionError, match=message):
        parse_config(raw)


def test_shipped_configs_parse_and_the_trainer_accepts_their_trials():

    for name in ("demo-cpu", "vit-b-16-gpu", "vit-h-14-gpu"):
        cfg = load_config(ROOT / "configs" / "search" / f"{name}.yaml")
        check_trial_flags(cfg)  # what the search checks before its first trial
        assert {"lr", "wd", "warmup", "batch-size"} <= set(cfg.space) and cfg.n_trials > 0, name
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
    assert (big["batch-size"].low, big["batch-size"].high) == (16, 360) and None in big["text-prompt"].choices
    demo = load_config(ROOT / "configs" / "search" / "demo-cpu.yaml", ["device=cuda:1", "resume=", "max-steps=7"])
    argv = flags_to_argv(trial_flags(demo, demo.enqueue[0]))  # trial 0 of the demo: the default fine-tune
    assert "--resume" not in argv and argv[argv.index("--device") + 1] == "cuda:1"
    assert argv[argv.index("--max-steps") + 1] == "7" and "--lora-rank" not in argv and "--freeze-vision" not in argv


@pytest.mark.filterwarnings("ignore:Fixed parameter")
def test_search_records_prunes_survives_failures_and_nan_and_reports(tmp_path, fake_train):
    enqueue = [
        {"lr": 1e-2, "freeze-vision": True},  # learns: complete
        {"lr": 1e-4, "freeze-vision": False},  # slow: pruned at its first validation
        {"lr": 0.9, "freeze-vision": False},  # raises "out of memory"
        {"lr": 0.2, "freeze-vision": False},  # validates to NaN
    ]
    raw = fake_config(tmp_path, n_trials=4, plots="end", enqueue=enqueue, storage=None)  # the default SQLite
    summary = run_search(parse_config(raw), fake_train[0])
    study = tmp_path / "out" / "s"
    df = pd.read_csv(study / "trials.csv")
    assert (summary["n_trials"], summary["complete"]) == (4, 1) and df.loc[1, "pruned_at"] == 1
    assert list(df.columns[:4]) == ["number", "state", "value", "run_dir"] and "params_freeze-vision" in df.columns
    assert list(df["state"]) == ["COMPLETE", "PRUNED", "FAIL", "FAIL"] and "nan" in df.loc[3, "fail_reason"]
    assert df.loc[2, "fail_reason"] == "RuntimeError: CUDA out of memory (stand-in)"
    for row in df.itertuples():
        assert Path(row.run_dir) == study / "trials" / f"{row.number:04d}"
    top = df.loc[0]  # the one complete trial; its value: its best main-set validation
    records = metrics(top["run_dir"])
    assert top["value"] == max(r["mean_recall"] for r in records if "set" not in r)
    assert (top["number"], top["value"]) == (summary["best_trial"], pytest.approx(summary["best_value"]))
    assert top["best_checkpoint"] == str(Path(top["run_dir"]) / "checkpoints" / "best.pt")
    command = (study / "best_command.sh").read_text()
    assert command.startswith("#!/usr/bin/env bash\n# best trial") and os.access(study / "best_command.sh", os.X_OK)
    assert "bash Chinese-CLIP/train_clip.sh \\\n  --max-steps 4 \\\n  --lr " in command
    best_cfg = yaml.safe_load((study / "best_config.yaml").read_text())
    assert best_cfg["lr"] == pytest.approx(top["params_lr"]) and best_cfg["name"] == "s-best"
    for png in ("history", "intermediate", "parallel_coordinate"):
        assert (study / f"{png}.png").stat().st_size > 1000, png


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


def test_a_bad_flag_is_a_failure_not_a_crash(tmp_path, fake_train):
    raw = fake_config(tmp_path, n_trials=2, pruner="none", enqueue=[{"lr": 1e-3}], base={"not-a-flag": 3})
    summary = run_search(parse_config(raw), fake_train[0])
    assert (summary["fail"], summary["complete"]) == (2, 0)
    reasons = pd.read_csv(tmp_path / "out" / "s" / "trials.csv")["fail_reason"]
    assert all(r == "trainer exited with code 2" for r in reasons)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test plays a dead worker with study.ask()
@pytest.mark.parametrize("storage", ["sqlite", "journal"])  # another host's worker: by heartbeat; this host's: at once
def test_resume_counts_toward_total_and_recovers_a_dead_worker_s_trial(tmp_path, fake_train, storage):
    more = {"storage": None} if storage == "sqlite" else {}
    cfg = parse_config(fake_config(tmp_path, n_trials=2, pruner="none", heartbeat=1, grace_period=2, **more))
    run_search(cfg, fake_train[0])
    study = optuna.load_study(study_name="s", storage=make_storage(cfg))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a worker that died mid-trial: RUNNING in storage, owned by a pid that no longer exists
    t = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    host = "another-host" if storage == "sqlite" else worker_info()["host"]
    t.set_user_attr("worker", {"host": host, "pid": dead.pid, "started": None})
    if storage == "sqlite":
        study._storage.record_heartbeat(t._trial_id)  # its last heartbeat; the search fails it 2 s later
    study.ask()  # a trial killed before it got its worker attribute (and heartbeat): not counted, left alone
    cfg.n_trials = 3
    summary = run_search(cfg, fake_train[0])
    trials = optuna.load_study(study_name="s", storage=make_storage(cfg)).trials
    assert [tr.number for tr in trials] == [0, 1, 2, 3, 4]  # grew; nothing restarted
    assert trials[2].state.name == "FAIL" and not_counted(trials[2]) and trials[3].state.name == "RUNNING"
    assert trials[4].user_attrs["retry_of"] == 2 and trials[4].params["lr"] == t.params["lr"]
    assert summary["complete"] == 3 and run_search(cfg, fake_train[0])["n_trials"] == 5  # target met: no more


def test_subprocess_mode_tails_metrics_and_stops_a_pruned_child(tmp_path, fake_train):
    enqueue = [{"lr": 1e-2, "freeze-vision": True}, {"lr": 1e-4, "freeze-vision": True}]
    raw = child_config(tmp_path, fake_train[1], n_trials=2, enqueue=enqueue, base={"max-steps": 40, "sleep": 0.05})
    run_search(parse_config({**raw, "pruner": {"name": "median", "n_startup_trials": 1}}))
    df = pd.read_csv(tmp_path / "out" / "s" / "trials.csv")
    assert list(df["state"]) == ["COMPLETE", "PRUNED"]
    assert df.loc[0, "value"] == pytest.approx(100 * (1 - 2.718281828**-40), rel=1e-3)
    assert len((Path(df.loc[1, "run_dir"]) / "metrics.jsonl").read_text().splitlines()) < 2 * 40  # stopped early


def test_sigterm_stops_the_child_and_requeues_the_trial(tmp_path, fake_train):
    """The trial's child sends the search SIGTERM (a scheduler preempting the job) after its first validation."""
    raw = child_config(tmp_path, fake_train[1], n_trials=2, base={"max-steps": 40, "sleep": 0.1, "term-parent": True})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as stopped:
        search_cli.main(["--config", str(tmp_path / "s.yaml")])
    metrics = tmp_path / "out" / "s" / "trials" / "0000" / "metrics.jsonl"
    size = metrics.stat().st_size
    time.sleep(0.5)
    assert stopped.value.code == 130 and metrics.stat().st_size == size  # the child was stopped with its parent
    t0, t1 = _trials(raw)
    assert t0.state.name == "FAIL" and t0.user_attrs["interrupted"]
    assert t1.state.name == "WAITING" and t1.user_attrs["retry_of"] == 0
    run_search(parse_config({**raw, "base": {"max-steps": 2}}))
    trials = _trials(raw)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"] and trials[1].params == t0.params


def worker_killed_mid_trial(tmp_path, train, script, storage: str) -> None:
    """Another worker killed with -9 mid-trial: its trial, left alone while it lived, is failed at once and re-run."""
    raw = child_config(tmp_path, script, name="k", n_trials=2, storage=storage, grace_period=3600)
    (tmp_path / "k.yaml").write_text(yaml.safe_dump({**raw, "base": {"max-steps": 40, "sleep": 0.25}}))
    victim = subprocess.Popen([*WORKER, str(tmp_path / "k.yaml")])
    rdb, killed, seen = optuna.storages.RDBStorage(storage), {}, []

    def victim_mid_trial() -> bool:
        try:
            trials = optuna.load_study(study_name="k", storage=rdb).get_trials(deepcopy=False)
        except KeyError:  # not created yet
            return False
        killed.update(next((t.params for t in trials if t.state.name == "RUNNING" and t.intermediate_values), {}))
        return bool(killed)

    def killing(argv, on_validation=None):  # this worker's first trial: the victim dies while it runs
        if victim.poll() is None:
            seen.extend(t.state.name for t in optuna.load_study(study_name="k", storage=rdb).trials)
            victim.kill()  # -9: no chance to mark its trial; its trainer child gets SIGTERM (parent death signal)
            victim.wait()
        train(argv, on_validation)

    try:
        wait_for(victim_mid_trial, victim, 120, "a validation in the victim's trial")
        summary = run_search(parse_config({**raw, "mode": "inprocess", "launcher": None}), killing)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    trials = optuna.load_study(study_name="k", storage=rdb).trials
    assert seen == ["RUNNING", "RUNNING"] and [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert not_counted(trials[0]) and trials[0].user_attrs["worker"]["pid"] == victim.pid
    assert trials[2].user_attrs["retry_of"] == 0 and trials[2].params == killed
    assert {t.user_attrs["worker"]["pid"] for t in trials[1:]} == {os.getpid()}
    df = pd.read_csv(tmp_path / "out" / "k" / "trials.csv")
    assert df.loc[0, "fail_reason"] == DIED and (summary["complete"], summary["fail"]) == (2, 1)


def test_a_worker_killed_mid_trial_on_sqlite_is_retried_by_the_other(tmp_path, fake_train):
    worker_killed_mid_trial(tmp_path, *fake_train, f"sqlite:///{tmp_path / 'k.db'}")


def real_trainer_config(tmp_path, **changes) -> Path:
    """A search of the real trainer whose trials would fail at once: no LMDB there."""
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
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "search.yaml"


GPUS, SPACE = "--gpus-per-trial 4 --gpus 0,1", "space entry"
DROPOUT = {"lora-dropout": {"type": "float", "low": 0.0, "high": 1.5}}
TUNE = {"tune": {"choices": ["a", "b"], "sets": {"b": {"freeze-visoin": True}}}}


@pytest.mark.parametrize(
    "changes, argv, message",  # changes to the config ("marker": a file written first), the command line's flags
    [
        ({}, "--set lrr=1e-4", r"--set lrr=1e-4: --lrr is not a flag of solution.train \(did you mean --lr\?\)"),
        ({"base": {"batch_sise": 8}}, "", r"base key 'batch-sise': --batch-sise is not a flag .*--batch-size"),
        ({"space": {"augment": ["none", "strong"]}}, "", f"{SPACE} 'augment' = 'strong' cannot start: .*choice"),
        ({}, "--set lora-rank=true", r"the first trial cannot start: argument --lora-rank: expected one argument"),
        ({}, "--set max-steps=many", r"argument --max-steps: invalid int value: 'many'"),
        ({"space": {"warmup": {"type": "int", "low": -5, "high": 10}}}, "", r"the first trial cannot start: .*-5"),
        ({"space": DROPOUT}, "", f"{SPACE} 'lora-dropout' = 1.5 cannot start: .*--lora-dropout 1.5"),
        ({"space": TUNE}, "", f"{SPACE} 'tune', sets.b: --freeze-visoin is not a flag"),
        ({}, "--storage foo://bar", re.escape(f"storage 'foo://bar': unknown scheme 'foo'; accepted: {ACCEPTED}")),
        ({}, "--storage postgres://me@localhost/optuna", "unknown scheme 'postgres'"),  # postgresql:// is the name
        ({}, "--storage study.db", "'study.db': not a URL"),
        ({}, "--storage postgresql://me:secret@127.0.0.1:1/o", r"open storage 'postgresql://me:\*\*\*@127.+refused"),
        ({}, GPUS, re.escape("gpus_per_trial 4 needs mode: subprocess")),
        ({"mode": "subprocess"}, f"{GPUS} --set device=cuda", re.escape("4 exceeds the 2 GPU(s) this worker may use")),
        ({"marker": "out/s/params.json"}, "", r"study folder .*/out/s is a run folder, not a study folder"),
        ({"marker": "out/s/soup_log.jsonl"}, "", "is a soup folder, not a study folder"),
        ({"marker": "out/s/ensemble.json"}, "", "ensemble folder, not a study folder"),
        ({"marker": "out/params.json"}, "", r"lies inside .*/out, a run folder"),  # out: a run folder
        ({"marker": "out/imgs/data.mdb"}, "", r"lies inside .*/out, an lmdb folder"),
        ({"marker": "out/train_imgs.tsv"}, "", r"lies inside .*/out, a data folder"),
        ({"marker": "search.yaml"}, "", r"search.yaml: not UTF-8 text \(byte 6\)"),
    ],
)
def test_a_search_that_cannot_start_a_trial_is_refused_in_one_line(
    tmp_path, capsys, monkeypatch, changes, argv, message
):
    marker = changes.get("marker")  # a file making the study folder another kind; search.yaml: not UTF-8
    config = real_trainer_config(tmp_path, **{k: v for k, v in changes.items() if k != "marker"})
    if marker:
        (tmp_path / marker).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / marker).write_bytes(b"name: \xff\n" if marker == "search.yaml" else b"{}")
    before = sorted(tmp_path.rglob("*"))
    rc, error = one_error_line(capsys, monkeypatch, search_cli.main, ["--config", str(config), *argv.split()])
    assert rc == 2 and re.search(message, error) and "secret" not in error, error
    assert sorted(tmp_path.rglob("*")) == before  # refused before anything was written


def test_a_search_in_which_no_trial_completes_exits_2_after_its_summary(tmp_path, fake_train, capsys, monkeypatch):
    raw = child_config(tmp_path, fake_train[1], n_trials=2, space={"lr": {"type": "float", "low": 0.5, "high": 0.9}})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))  # the stand-in runs out of memory
    monkeypatch.setattr(common, "setup_logging", lambda *a: None)
    assert common.run_cli(search_cli.main, ["--config", str(tmp_path / "s.yaml")]) == 2
    out, err = capsys.readouterr()
    [error] = [line for line in err.splitlines() if line.startswith("error:")]
    assert error.startswith("error: study 's' completed no trial (2 failed, 0 pruned; first failure: trial 0: ")
    assert "out of memory" in error and error.endswith(f"see {tmp_path / 'out' / 's' / 'trials.csv'}")
    assert json.loads(out.strip().splitlines()[-1])["fail"] == 2  # the summary is still printed
    raw["space"]["lr"] = {"type": "float", "low": 1e-3, "high": 1e-2}  # one trial more, and it completes
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**raw, "n_trials": 3}))
    assert common.run_cli(search_cli.main, ["--config", str(tmp_path / "s.yaml")]) == 0


@pytest.mark.parametrize("out", ["missing", None, ""])
def test_a_config_without_out_keeps_its_study_under_runs_search(tmp_path, monkeypatch, caplog, out):
    raw = {**fake_config(tmp_path, n_trials=0, storage=None), "out": out}
    if out == "missing":
        del raw["out"]
    monkeypatch.chdir(tmp_path)
    run_search(parse_config(raw, "s.yaml"), train_main=print)  # no trial: the study alone
    assert (tmp_path / "runs" / "search" / "s" / "trials.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # nothing else in the cwd
    assert "s.yaml gives no out: the study folder is runs/search/s" in caplog.text


def world_base(world, **more) -> dict:  # the real trainer's trial settings on the shared world
    base = yaml.safe_load(
        f"{{train-data: {world.lmdb('train')}, val-data: {world.lmdb('valid')}, resume: {world.base}, "
        "context-length: 32, batch-size: 24, max-steps: 4, valid-step-interval: 2, valid-epoch-interval: 0, "
        "save-epoch-frequency: 0, warmup: 0, precision: fp32, device: cpu, num-workers: 0, valid-num-workers: 0, "
        "no-progress: true, no-plot: true}"
    )
    return {**base, **more}


def test_real_search_on_the_world_completes_survives_a_raising_trial_and_gives_a_ready_command(tmp_path, world):
    raw = {
        "name": "real",
        "out": str(tmp_path),
        "n_trials": 2,
        "plots": False,
        "pruner": "none",
        "base": world_base(world, **{"report-to": "tensorboard"}),
        "space": {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}, "batch-size": [24, 4096]},
        "enqueue": [{"lr": 1e-4, "batch-size": 24}, {"lr": 1e-4, "batch-size": 4096}],  # the second: too large
    }
    summary = run_search(parse_config(raw))
    assert (summary["n_trials"], summary["complete"], summary["fail"]) == (2, 1, 1), summary
    df = pd.read_csv(tmp_path / "real" / "trials.csv")
    assert list(df["state"]) == ["COMPLETE", "FAIL"] and "larger than" in df.loc[1, "fail_reason"]
    run0 = Path(df.loc[0, "run_dir"])
    valid = metrics(run0, "valid")
    assert [r["step"] for r in valid] == [2, 4] and max(r["mean_recall"] for r in valid) == df.loc[0, "value"]
    command = (tmp_path / "real" / "best_command.sh").read_text()
    assert f"--resume {world.base}" in command and "--lr 0.0001" in command and "--name real-best" in command
    again = parse_args(["--config", str(tmp_path / "real" / "best_config.yaml")])  # train_clip.sh --config
    assert (again.lr, again.resume, again.name, again.max_steps) == (1e-4, str(world.base), "real-best", 4)
    assert study_checkpoints(tmp_path / "real", 2) == [run0 / "checkpoints" / "best.pt"]  # model_soup --from-study
    [events] = run0.rglob("events.out.tfevents.*")  # tensorboard --logdir {study folder}: a run per trial
    assert scalars(events.parent)
