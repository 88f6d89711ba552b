"""The search on a real database: two workers on one PostgreSQL study, one killed with -9 mid-trial.

The PostgreSQL server is Debian's (``initdb``/``pg_ctl`` under ``/usr/lib/postgresql/*/bin``), started
for this module in a temporary folder on a free localhost port and stopped at the end. It refuses to
run as root, so as root it runs as the ``postgres`` user. The test is skipped only where the server
binaries are absent.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from test_search import fake_config, fake_train, finish, wait_for  # noqa: F401 (fake_train is a fixture)

from solution.soups.ingredients import study_checkpoints
from solution.studies.storage import DIED, not_counted

log = logging.getLogger(__name__)


def _pg_bindir() -> Path | None:
    found = [
        p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_ctl").is_file() and (p / "initdb").is_file()
    ]
    return max(found, key=lambda p: tuple(int(x) for x in p.parent.name.split(".") if x.isdigit())) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """``postgresql://postgres@127.0.0.1:PORT/postgres`` of a throwaway server (trust auth, no fsync)."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin; "
            "apt-get install postgresql"
        )
    root = Path(tempfile.mkdtemp(prefix="search-pg-"))  # under /tmp: the postgres user must reach it
    as_pg: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_pg = ["runuser", "-u", "postgres", "--"]
    data, logfile = root / "data", root / "server.log"
    started = False
    try:
        subprocess.run(
            [
                *as_pg,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        for _ in range(3):  # a free port may be taken between the probe and the start
            port = _free_port()
            opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
            r = subprocess.run(
                [
                    *as_pg,
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(logfile),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    opts,
                    "start",
                ],
                capture_output=True,
                timeout=120,
            )
            if r.returncode == 0:
                started = True
                break
        assert started, logfile.read_text()[-2000:] if logfile.exists() else r.stderr.decode()
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(
                [*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgresql_one_killed_mid_trial(tmp_path, fake_train, postgres_url):  # noqa: F811
    """Worker 0 is killed with -9 while its trial runs; worker 1 fails that trial once its heartbeat is
    older than the grace period, re-runs its parameters, and the study ends with its full budget."""
    _, script = fake_train
    n_trials = 8  # enough that worker 0 completes one and is killed in its next, even if it starts late
    raw = fake_config(
        tmp_path,
        name="pg",
        n_trials=n_trials,
        mode="subprocess",
        pruner="none",
        launcher=[sys.executable, str(script)],
        sampler={"name": "random"},
        plots="end",
        heartbeat=1,
        grace_period=4,
        base={"max-steps": 8, "valid-step-interval": 1, "sleep": 0.25},
    )
    (tmp_path / "pg.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "solution.search", "--config", str(tmp_path / "pg.yaml"), "--storage", postgres_url]
    storage = optuna.storages.RDBStorage(postgres_url)
    t0 = time.monotonic()
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logs[i]) for i in range(2)]
    victim, killed = workers[0], {}

    def victim_mid_trial() -> bool:  # worker 0 has completed a trial and reported a validation in the next
        try:
            study = optuna.load_study(study_name="pg", storage=storage)
        except KeyError:  # not created yet
            return False
        mine = [
            t for t in study.get_trials(deepcopy=False) if (t.user_attrs.get("worker") or {}).get("pid") == victim.pid
        ]
        if not any(t.state.name == "COMPLETE" for t in mine):
            return False
        for t in mine:
            if t.state.name == "RUNNING" and t.intermediate_values:
                killed.update(number=t.number, params=t.params)
                return True
        return False

    try:
        wait_for(victim_mid_trial, victim, 120, "a validation in a trial of worker 0")
        victim.kill()  # -9: no chance to mark its trial; its trainer child gets SIGTERM (parent death signal)
        victim.wait()
        t_kill = time.monotonic() - t0
        out, _ = finish(workers[1], 240)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        for f in logs:
            f.close()
    wall = time.monotonic() - t0
    assert workers[1].returncode == 0, (tmp_path / "worker1.log").read_text()[-3000:]

    trials = optuna.load_study(study_name="pg", storage=storage).trials
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states, states  # nothing stuck
    dead = trials[killed["number"]]
    assert dead.state.name == "FAIL" and not_counted(dead) and "fail_reason" not in dead.user_attrs
    assert dead.user_attrs["worker"]["pid"] == victim.pid
    retries = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE" and retries[0].params == killed["params"]
    assert retries[0].user_attrs["worker"]["pid"] == workers[1].pid  # re-run by the surviving worker
    counted = [t for t in trials if not not_counted(t)]
    assert all(t.state.name == "COMPLETE" for t in counted)
    assert n_trials <= len(counted) <= n_trials + 1  # the budget; two workers racing may add one
    assert [t for t in trials if not_counted(t)] == [dead]
    assert {t.user_attrs["worker"]["pid"] for t in counted} == {w.pid for w in workers}  # both did some

    study_dir = tmp_path / "out" / "pg"
    df = pd.read_csv(study_dir / "trials.csv")
    assert len(df) == len(trials) and df.loc[dead.number, "fail_reason"] == DIED
    best = max(counted, key=lambda t: t.value)
    assert study_checkpoints(study_dir, 1) == [Path(best.user_attrs["run_dir"]) / "checkpoints" / "best.pt"]
    summary = yaml.safe_load(out.decode().strip().splitlines()[-1])
    assert summary["complete"] == len(counted) and summary["fail"] == 1
    by_worker = {w.pid: sum(1 for t in counted if t.user_attrs["worker"]["pid"] == w.pid) for w in workers}
    log.info(
        "PostgreSQL run: %d trials (%d complete, %d failed = killed trial %d of worker 0, retried as trial %d "
        "by worker 1); complete by worker 0/1: %d/%d; killed at %.1f s; wall %.1f s",
        len(trials),
        len(counted),
        states.count("FAIL"),
        dead.number,
        retries[0].number,
        by_worker[victim.pid],
        by_worker[workers[1].pid],
        t_kill,
        wall,
    )
