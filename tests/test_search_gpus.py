"""GPUs per trial (solution.studies.gpus) on fake GPU lists: flock leases; a child gets its CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import json
import logging
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
from test_search import FAKE_TRAINER, WORKER, child_config, fake_config, wait_for

from solution.common import SolutionError
from solution.studies.gpus import GpuPool, gpu_pool
from solution.studies.search_config import parse_config
from solution.studies.storage import make_storage
from solution.studies.study import run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Waited(Exception):
    pass


def _no_wait(seconds):  # the pool's sleep while it waits for GPUs: here, the end of the test's patience
    raise Waited


def test_leases_are_disjoint_wait_and_come_back_on_exit_and_on_error(tmp_path, caplog):
    a = GpuPool(["0", "1", "2", "3"], 2, tmp_path)  # two workers of one node: two pools, one folder
    b = GpuPool(["0", "1", "2", "3"], 2, tmp_path)
    with a.lease("trial 0") as l0, b.lease("trial 1") as l1:
        assert (l0.gpus, l1.gpus) == (["0", "1"], ["2", "3"])
        with caplog.at_level(logging.INFO), pytest.raises(Waited), b.lease("trial 2", sleep=_no_wait):
            pass
        assert "trial 2: waiting for 2 free GPU(s) of 0,1,2,3" in caplog.text
        assert f"pid {os.getpid()}: trial 0" in (tmp_path / "gpu-0.lock").read_text()
        assert l1.env({"PATH": "/bin"}) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2,3"}
    with pytest.raises(RuntimeError), a.lease("trial 3") as l3:  # a trial that raises gives its GPUs back
        assert l3.gpus == ["0", "1"]
        raise RuntimeError("trial failed")
    with a.lease("trial 4") as l4, b.lease("trial 5") as l5:
        assert (l4.gpus, l5.gpus) == (["0", "1"], ["2", "3"])
    one = GpuPool(["0", "1", "2"], 2, tmp_path)  # 3 GPUs, 2 a trial: one trial at a time
    with one.lease("trial 6"), pytest.raises(Waited), one.lease("trial 7", sleep=_no_wait):
        pass


@pytest.mark.parametrize(
    "study, env, message",
    [
        (
            {"gpus_per_trial": 3, "gpus": "0,1"},
            None,
            r"exceeds the 2 GPU\(s\) this worker may use \(0,1, from --gpus\)",
        ),
        ({"gpus_per_trial": 2}, "0", r"gpus_per_trial 2 exceeds the 1 GPU\(s\) .*\(0, from CUDA_VISIBLE_DEVICES\)"),
        ({"gpus_per_trial": 1}, "", r"exceeds the 0 GPU\(s\) .*\(none, from CUDA_VISIBLE_DEVICES\)"),
        ({"gpus_per_trial": 1, "gpus": "2,7"}, "2,3", "GPU 7 is not among this worker's CUDA_VISIBLE_DEVICES=2,3"),
    ],
)
def test_a_worker_without_the_gpus_it_needs_is_one_error(tmp_path, study, env, message):
    cfg = parse_config(fake_config(tmp_path, mode="subprocess", launcher=["x"], **study))
    with pytest.raises(SolutionError, match=message):
        gpu_pool(cfg, env={} if env is None else {"CUDA_VISIBLE_DEVICES": env})


def test_inprocess_trial_gets_its_gpu_as_a_device_and_the_environment_stays(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # this worker sees GPUs 3 and 5 as cuda:0 and cuda:1
    seen = []

    def train(argv, on_validation=None):
        seen.append((argv[argv.index("--device") + 1], os.environ["CUDA_VISIBLE_DEVICES"]))
        on_validation({"step": 1, "epoch": 0, "kind": "valid", "mean_recall": 50.0})

    raw = fake_config(tmp_path, n_trials=2, gpus_per_trial=1, gpus=[5], gpu_lease_dir=str(tmp_path / "leases"))
    with caplog.at_level(logging.INFO):
        summary = run_search(parse_config(raw), train_main=train)
    assert summary["complete"] == 2 and seen == [("cuda:1", "3,5")] * 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert "trial 0: GPU(s) 5 (--device cuda:1)" in caplog.text and "trial 1: GPU(s) 5" in caplog.text
    df = pd.read_csv(tmp_path / "out" / "s" / "trials.csv")
    assert list(df["gpus"]) == [5, 5]


SPY = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.path.dirname(__file__))
    from fake_trainer import main
    argv = sys.argv[1:]
    run = os.path.join(argv[argv.index("--logs") + 1], argv[argv.index("--name") + 1])
    main(argv)
    with open(os.path.join(run, "spy.json"), "w") as f:
        json.dump({"cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
""")


def test_a_subprocess_trial_gets_its_gpus_as_its_child_s_environment_and_gives_them_back(tmp_path, monkeypatch, caplog):
    (tmp_path / "spy.py").write_text(SPY)
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    raw = child_config(tmp_path, tmp_path / "spy.py", n_trials=2)
    raw.update(gpus_per_trial=2, gpus="2,0,3,1", gpu_lease_dir=str(tmp_path / "leases"), base={"max-steps": 2})
    with GpuPool(["2"], 1, tmp_path / "leases").lease("another worker's trial"), caplog.at_level(logging.INFO):
        summary = run_search(parse_config(raw))
    assert summary["complete"] == 2 and "CUDA_VISIBLE_DEVICES" not in os.environ
    for t in optuna.load_study(study_name="s", storage=make_storage(parse_config(raw))).trials:
        spy = json.loads((Path(t.user_attrs["run_dir"]) / "spy.json").read_text())
        assert spy["cvd"] == t.user_attrs["gpus"] == "0,3"  # the first two free GPUs, GPU 2 being held
        assert f"trial {t.number}: GPU(s) 0,3 (CUDA_VISIBLE_DEVICES=0,3)" in caplog.text
    assert list(pd.read_csv(tmp_path / "out" / "s" / "trials.csv", dtype={"gpus": str})["gpus"]) == ["0,3"] * 2
    with GpuPool(["0", "1", "2", "3"], 4, tmp_path / "leases").lease("after", sleep=_no_wait) as lease:
        assert lease.gpus == ["0", "1", "2", "3"]  # all given back


def test_a_child_that_outlives_its_killed_worker_keeps_its_gpus(tmp_path):
    """The trial's child inherits the lock: GPUs in use by an orphan are not handed out."""
    orphan_code = "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    orphan_code += "open('started', 'w').write(str(os.getpid())); time.sleep(300)"
    raw = child_config(tmp_path, "-", n_trials=1, launcher=[sys.executable, "-c", orphan_code])
    raw.update(gpus_per_trial=1, gpus="0", gpu_lease_dir=str(tmp_path / "leases"))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}  # the worker needs no torch to count GPUs
    worker = subprocess.Popen([*WORKER, str(tmp_path / "s.yaml")], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    started = tmp_path / "started"
    wait_for(lambda: started.exists() and started.read_text(), worker, 120, "the trial's child")
    orphan = int(started.read_text())
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    pool = GpuPool(["0"], 1, tmp_path / "leases")
    try:
        with pytest.raises(Waited):  # the orphan (which ignores SIGTERM) still runs on GPU 0
            with pool.lease("next", sleep=_no_wait):
                pass
    finally:
        os.kill(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 30  # a hang guard: the killed orphan's lock goes with it
    while not _lease_free(pool):
        assert time.monotonic() < deadline, "GPU 0 still leased 30 s after the orphan was killed"
        time.sleep(0.1)


def _lease_free(pool: GpuPool) -> bool:
    try:
        with pool.lease("probe", sleep=_no_wait):
            return True
    except Waited:
        return False
