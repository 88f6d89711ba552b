"""Two search workers on a PostgreSQL study (Debian's server, started here), one killed with -9 mid-trial."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_search import fake_train, worker_killed_mid_trial  # noqa: F401 (fake_train is a fixture)


@pytest.fixture(scope="module")
def postgres_url():
    """``postgresql://postgres@127.0.0.1:PORT/postgres`` of a throwaway server (trust auth, no fsync)."""
    found = [
        p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_ctl").is_file() and (p / "initdb").is_file()
    ]
    if not found:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin")
    bindir = max(found, key=lambda p: tuple(int(x) for x in p.parent.name.split(".") if x.isdigit()))
    root = Path(tempfile.mkdtemp(prefix="search-pg-"))  # under /tmp: the postgres user must reach it
    as_pg: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_pg = ["runuser", "-u", "postgres", "--"]
    data, logfile, started = root / "data", root / "server.log", False
    try:
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"]
        subprocess.run([*as_pg, *initdb], check=True, capture_output=True, timeout=120)
        for _ in range(3):  # a free port may be taken between the probe and the start
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
            start = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", "60", "-o", opts, "start"]
            r = subprocess.run([*as_pg, *start], capture_output=True, timeout=120)
            if r.returncode == 0:
                started = True
                break
        assert started, logfile.read_text()[-2000:] if logfile.exists() else r.stderr.decode()
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            stop = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
            subprocess.run([*as_pg, *stop], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgresql_one_killed_mid_trial(tmp_path, fake_train, postgres_url):  # noqa: F811
    worker_killed_mid_trial(tmp_path, *fake_train, postgres_url)
