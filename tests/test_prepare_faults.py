"""``python -m solution.prepare`` under hostile inputs and faults: two runs on one split, a run
killed mid-way, MUGE files of the user's in the way, a CSV quote left open, non-UTF-8 texts,
outputs that cannot be written, --make-valid leaving an empty split, a full disk.

Each case: exit code 2, one ``error:`` line naming the file and what is wrong, nothing written
half-way, the inputs and the previous LMDB untouched."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import solution.data.make_lmdb as prep
from solution.common import run_cli
from solution.data.inputs import Text, split_off_valid
from solution.data.lmdb_io import LMDBSplit
from solution.prepare import main


def _jpeg(color=(200, 40, 40), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def _muge(d: Path, images, texts, split="train") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{split}_imgs.tsv").write_text("".join(f"{i}\t{b}\n" for i, b in images), encoding="utf-8")
    (d / f"{split}_texts.jsonl").write_text(
        "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    return d


def _argv(data_dir, *extra, splits="train"):
    return ["--data-dir", str(data_dir), "--splits", splits, "--workers", "1", "--no-progress", *map(str, extra)]


def _error_line(capsys, argv) -> str:
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def _snapshot(*folders: Path) -> dict:
    """Every file under ``folders`` (hidden ones too) -> its bytes (a lock file: only that it is there,
    as its content says who took it last, and when)."""
    return {
        p: b"" if p.name.endswith(".lock") else p.read_bytes()
        for d in folders
        if d.exists()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _queries(split_dir: Path) -> dict:
    split = LMDBSplit(split_dir)
    try:
        return {text: ids for text, ids in split.queries().values()}
    finally:
        split.close()


def _leftovers(lmdb_dir: Path) -> list[str]:
    """What a run leaves in ``lmdb_dir`` besides the splits and their lock files."""
    return sorted(p.name for p in lmdb_dir.glob(".*") if not p.name.endswith(".lock"))


@pytest.fixture
def old(tmp_path):
    """A MUGE folder and the LMDB a first prepare built from it (the "previous LMDB")."""
    d = _muge(
        tmp_path / "muge",
        [(1, _b64(_jpeg())), (2, _b64(_jpeg((0, 0, 200))))],
        [{"text_id": 1, "text": "红色", "image_ids": [1]}, {"text_id": 2, "text": "蓝色", "image_ids": [2]}],
    )
    assert run_cli(main, _argv(d)) == 0
    assert _queries(d / "lmdb" / "train") == {"红色": [1], "蓝色": [2]}
    return d


# ---------------------------------------------------------------- two runs, a killed run


def _blocked_run(tmp_path: Path, lmdb_dir: Path):
    """A prepare (its own process) that holds the train split of ``lmdb_dir`` and waits: its one image
    is a FIFO it reads until the test writes into it (see :func:`_release`)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    os.mkfifo(raw / "new.jpg")
    (raw / "caps.jsonl").write_text(
        json.dumps({"image": "new.jpg", "text": "新的"}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "solution.prepare",
            *_argv(tmp_path / "a"),
            "--lmdb-dir",
            lmdb_dir,
            "--images-dir",
            raw,
            "--captions",
            raw / "caps.jsonl",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not list(lmdb_dir.glob(".train.building*")):  # it has started building: the first output it makes
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc, raw / "new.jpg"


def _release(proc, fifo: Path) -> None:
    deadline = time.time() + 60
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds once the reader has it open
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the blocked prepare never opened its image"
            time.sleep(0.05)
    os.set_blocking(fd, True)
    os.write(fd, _jpeg((20, 200, 20)))
    os.close(fd)


def test_two_runs_on_one_split_the_second_is_refused_and_nothing_is_lost(old, tmp_path, capsys):
    lmdb_dir = old / "lmdb"
    proc, fifo = _blocked_run(tmp_path, lmdb_dir)
    try:
        # a second run on the same split while the first builds it: refused, naming the holder
        line = _error_line(capsys, _argv(old, "--lmdb-dir", lmdb_dir))
        assert f"pid {proc.pid}" in line and str(lmdb_dir / "train") in line and "in use" in line
        assert _queries(lmdb_dir / "train") == {"红色": [1], "蓝色": [2]}  # the old LMDB, whole
    finally:
        _release(proc, fifo)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert _queries(lmdb_dir / "train") == {"新的": [1]}  # the first run's LMDB, whole
    assert _leftovers(lmdb_dir) == []


def test_a_run_killed_mid_way_keeps_the_old_lmdb_and_the_next_run_cleans_up(old, tmp_path):
    lmdb_dir = old / "lmdb"
    proc, _ = _blocked_run(tmp_path, lmdb_dir)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _queries(lmdb_dir / "train") == {"红色": [1], "蓝色": [2]}
    assert len(_leftovers(lmdb_dir)) == 1  # its temp folder
    assert run_cli(main, _argv(old)) == 0  # the kernel dropped its lock; its temp folder goes
    assert _leftovers(lmdb_dir) == [] and _queries(lmdb_dir / "train") == {"红色": [1], "蓝色": [2]}


def test_a_split_left_mid_swap_by_a_killed_run_is_put_back(old, capsys):
    """Killed between its two renames, a run leaves the previous split as ``.train.old`` and no ``train``:
    the next run puts it back first, so even when that run fails the split is there."""
    lmdb_dir = old / "lmdb"
    (lmdb_dir / "train").rename(lmdb_dir / ".train.old")
    (old / "train_texts.jsonl").write_bytes(b'{"text_id": 1, "text": "\xff"}\n')  # this run fails, later
    assert "not UTF-8" in _error_line(capsys, _argv(old))
    assert _queries(lmdb_dir / "train") == {"红色": [1], "蓝色": [2]} and _leftovers(lmdb_dir) == []


# ---------------------------------------------------------------- the user's MUGE files


def _csv_input(root: Path) -> Path:
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.jpg").write_bytes(_jpeg())
    (root / "imgs" / "b.jpg").write_bytes(_jpeg((0, 0, 200)))
    csv = root / "pairs.csv"
    csv.write_text("text,image_path\n红色,imgs/a.jpg\n蓝色,imgs/b.jpg\n", encoding="utf-8")
    return csv


@pytest.mark.parametrize("present", ["both", "texts"])
def test_csv_never_overwrites_the_users_muge_files(old, tmp_path, capsys, present):
    csv = _csv_input(tmp_path / "raw")
    if present == "texts":
        (old / "train_imgs.tsv").unlink()
    before = _snapshot(old)
    line = _error_line(capsys, _argv(old, "--csv", csv))
    name = "train_imgs.tsv" if present == "both" else "train_texts.jsonl"
    assert str(old / name) in line and "not written by prepare" in line
    assert _snapshot(old) == before  # byte for byte, the LMDB too; not even a lock file


def test_csv_replaces_its_own_muge_files_but_not_once_the_user_changed_them(tmp_path, capsys):
    csv = _csv_input(tmp_path / "raw")
    out = tmp_path / "out"
    assert run_cli(main, _argv(out, "--csv", csv)) == 0
    csv.write_text("text,image_path\n红色,imgs/a.jpg\n", encoding="utf-8")
    assert run_cli(main, _argv(out, "--csv", csv)) == 0  # its own output: replaced
    assert len((out / "train_texts.jsonl").read_text(encoding="utf-8").splitlines()) == 1
    with open(out / "train_texts.jsonl", "a", encoding="utf-8") as f:  # now the user's edit
        f.write(json.dumps({"text_id": 9, "text": "手写", "image_ids": [1]}, ensure_ascii=False) + "\n")
    before = _snapshot(out)
    assert "train_texts.jsonl" in _error_line(capsys, _argv(out, "--csv", csv))
    assert _snapshot(out) == before


# ---------------------------------------------------------------- malformed CSV


@pytest.mark.parametrize(
    "name, body, line, what",
    [
        ("pairs.csv", '红色,imgs/a.jpg\n"蓝色,imgs/b.jpg\n红色,imgs/b.jpg\n', 3, "never closed"),
        ("pairs.csv", '红色,imgs/a.jpg\n"蓝色,imgs/b.jpg\n红色,imgs/b.jpg\n又",imgs/a.jpg\n', 3, "swallows"),
        ("pairs.csv", '红色,imgs/a.jpg\n蓝色,"imgs/b.jpg\n红色,imgs/b.jpg\n",x\n', 3, "swallows"),
        ("pairs.csv", '红色,imgs/a.jpg\n"蓝"色,imgs/b.jpg\n', 3, "malformed CSV"),
        ("pairs.tsv", '红色\timgs/a.jpg\n"蓝色\timgs/b.jpg\n红色\timgs/b.jpg\n', 3, "never closed"),
    ],
)
def test_csv_quote_left_open_is_an_error_naming_the_line(tmp_path, capsys, name, body, line, what):
    _csv_input(tmp_path / "raw")
    table = tmp_path / "raw" / name
    sep = "\t" if name.endswith(".tsv") else ","
    table.write_text(f"text{sep}image_path\n" + body, encoding="utf-8")
    err = _error_line(capsys, _argv(tmp_path / "out", "--csv", table))
    assert f"{table}:{line}:" in err and what in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_csv_caption_over_two_lines_is_still_read(tmp_path, eol):
    """The strict reader still takes a quoted line break in a caption, and any line end."""
    _csv_input(tmp_path / "raw")
    table = tmp_path / "raw" / "pairs.csv"
    table.write_bytes('text,image_path\n"第一行\n第二行",imgs/a.jpg\n蓝色,imgs/b.jpg\n'.replace("\n", eol).encode())
    reports = main(_argv(tmp_path / "out", "--csv", table))
    assert reports["train"]["num_samples"] == 2 and reports["train"]["texts"]["skipped"] == 0


# ---------------------------------------------------------------- non-UTF-8 text


@pytest.mark.parametrize("workers", [1, 2])
def test_non_utf8_texts_jsonl_names_file_and_line(old, capsys, monkeypatch, workers):
    """In-process and in the worker that reads the texts while the images are stored."""
    monkeypatch.setattr(prep, "MIN_PARALLEL_BYTES", 0)  # workers=2: the texts are read by a worker
    texts = old / "train_texts.jsonl"
    lines = texts.read_bytes().splitlines(keepends=True)
    texts.write_bytes(lines[0] + lines[1].replace("蓝".encode(), b"\xff\xfe"))
    before = _snapshot(old)
    argv = _argv(old)
    argv[argv.index("--workers") + 1] = str(workers)
    line = _error_line(capsys, argv)
    assert f"{texts}:2: not UTF-8" in line
    assert _snapshot(old) == before and _leftovers(old / "lmdb") == []


@pytest.mark.parametrize("kind", ["csv", "captions"])
def test_non_utf8_table_names_file_and_line(tmp_path, capsys, kind):
    csv = _csv_input(tmp_path / "raw")
    if kind == "csv":
        table, extra = csv, ["--csv", csv]
        table.write_bytes("text,image_path\n红色,imgs/a.jpg\n".encode() + "蓝色".encode("gbk") + b",imgs/b.jpg\n")
    else:
        table = tmp_path / "raw" / "caps.jsonl"
        table.write_bytes(
            json.dumps({"image": "imgs/a.jpg", "text": "红"}).encode()
            + b"\n"
            + b'{"image": "imgs/b.jpg", "text": "'
            + "蓝色".encode("gbk")
            + b'"}\n'
        )
        extra = ["--images-dir", tmp_path / "raw", "--captions", table]
    line = _error_line(capsys, _argv(tmp_path / "out", *extra))
    assert f"{table}:{3 if kind == 'csv' else 2}: not UTF-8" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- outputs that cannot be written


@pytest.mark.parametrize(
    "case",
    [
        "lmdb_dir_is_a_file",
        "lmdb_dir_under_a_file",
        "split_is_a_file",
        "split_is_the_users_folder",
        "csv_data_dir_is_a_file",
    ],
)
def test_output_that_cannot_be_written_is_one_line_and_nothing_is_written(old, tmp_path, capsys, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("mine\n", encoding="utf-8")
    argv, want = _argv(old), None
    if case == "lmdb_dir_is_a_file":
        argv += ["--lmdb-dir", str(blocker)]
        want = f"--lmdb-dir {blocker} is a file"
    elif case == "lmdb_dir_under_a_file":
        argv += ["--lmdb-dir", str(blocker / "lmdb")]
        want = f"sits under {blocker}"
    elif case == "split_is_a_file":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "train").write_text("mine\n", encoding="utf-8")
        argv += ["--lmdb-dir", str(tmp_path / "out")]
        want = f"{tmp_path / 'out' / 'train'} is a file"
    elif case == "split_is_the_users_folder":
        (tmp_path / "out" / "train").mkdir(parents=True)
        (tmp_path / "out" / "train" / "holiday.jpg").write_bytes(_jpeg())
        argv += ["--lmdb-dir", str(tmp_path / "out")]
        want = "holiday.jpg: not an LMDB split"
    else:
        argv = _argv(blocker, "--csv", _csv_input(tmp_path / "raw"))
        want = f"--data-dir {blocker} is a file"
    before = _snapshot(old, tmp_path)
    line = _error_line(capsys, argv)
    assert want in line, line
    assert _snapshot(old, tmp_path) == before  # not even a lock file


# ---------------------------------------------------------------- --make-valid leaving an empty split


def _queries_tsv(d: Path, n: int, bad=()):
    good = _b64(_jpeg())
    return _muge(
        d,
        [(i, "not base64!" if i in bad else good) for i in range(1, n + 1)],
        [{"text_id": 100 + i, "text": f"查询{i}", "image_ids": [i]} for i in range(1, n + 1)],
    )


def _valid_image_ids(text_ids) -> list[int]:
    """The image ids of the queries ``--make-valid 0.5`` (seed 0) puts into valid (query i has image i)."""
    texts = [Text(t, f"查询{i}", [i]) for i, t in enumerate(text_ids, 1)]
    return [t.image_ids[0] for t in split_off_valid(texts, 0.5, 0)[1]]


def _no_locks(snapshot: dict) -> dict:
    return {p: b for p, b in snapshot.items() if not p.name.endswith(".lock")}


@pytest.mark.parametrize(
    "case", ["everything", "one_query", "valid_name_is_the_split", "valid_images_all_bad", "csv_valid_images_all_bad"]
)
def test_make_valid_that_leaves_an_empty_split_is_refused(tmp_path, capsys, case):
    fraction, extra, d = "0.5", [], tmp_path / "d"
    if case == "everything":
        _queries_tsv(d, 3)
        fraction, want = "0.9", "0.9 of 3 distinct labelled queries leaves no training query"
    elif case == "one_query":
        _queries_tsv(d, 1)
        want = "at least two distinct labelled queries, found 1"
    elif case == "valid_name_is_the_split":
        _queries_tsv(d, 4)
        want, extra = "--valid-name 'train'", ["--valid-name", "train"]
    elif case == "valid_images_all_bad":
        _queries_tsv(d, 2, bad=_valid_image_ids([101, 102]))
        want = "split 'valid' without a single pair"
    else:  # a CSV run wrote LMDBs and MUGE files; then valid's image went bad: all of them stay as they were
        (tmp_path / "raw").mkdir()
        for i in (1, 2):
            (tmp_path / "raw" / f"{i}.jpg").write_bytes(_jpeg())
        table = tmp_path / "raw" / "pairs.csv"
        table.write_text("text,image_path\n查询1,1.jpg\n查询2,2.jpg\n", encoding="utf-8")
        extra = ["--csv", table]
        assert run_cli(main, _argv(d, "--make-valid", fraction, *extra, splits="train,valid")) == 0
        for i in _valid_image_ids([1, 2]):
            (tmp_path / "raw" / f"{i}.jpg").write_bytes(b"<html>gone</html>")
        want = "split 'valid' without a single pair"
    before = _snapshot(d)
    line = _error_line(capsys, _argv(d, "--make-valid", fraction, *extra, splits="train,valid"))
    assert want in line, line
    assert _no_locks(_snapshot(d)) == _no_locks(before)  # nothing written (a lock file at most)
    if (d / "lmdb").exists():
        assert _leftovers(d / "lmdb") == []


# ---------------------------------------------------------------- a full disk


def test_disk_full_while_writing_an_lmdb_keeps_the_previous_one(old, small_disk, tmp_path, capsys):
    lmdb_dir = small_disk(1) / "lmdb"
    assert run_cli(main, _argv(old, "--lmdb-dir", lmdb_dir)) == 0  # the previous LMDB: small, it fits
    before = _snapshot(lmdb_dir)
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    big = _b64(buf.getvalue())
    n = 2 * (1 << 20) // len(big) + 1  # 2 MiB of images for a 1 MiB disk
    d = _muge(tmp_path / "big", [(i, big) for i in range(n)], [{"text_id": 1, "text": "噪声", "image_ids": [0]}])
    line = _error_line(capsys, _argv(d, "--lmdb-dir", lmdb_dir))
    assert f"disk full at {lmdb_dir}" in line
    assert _snapshot(lmdb_dir) == before and _leftovers(lmdb_dir) == []  # the partial temp folder is gone
    assert _queries(lmdb_dir / "train") == {"红色": [1], "蓝色": [2]}


def test_disk_full_found_by_the_background_sync_is_one_line_too(old, tmp_path, capsys, monkeypatch):
    """Where the disk fills at a sync (the flusher thread), not at a write: no thread traceback, the
    same one line (runs on any machine, no tmpfs needed)."""
    import errno
    import threading

    from solution.data import lmdb_io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lmdb_io.os, "fdatasync", full)
    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    before = _snapshot(old / "lmdb")
    d = _muge(
        tmp_path / "big",
        [(i, _b64(_jpeg())) for i in range(2 * lmdb_io.COMMIT_EVERY + 1)],
        [{"text_id": 1, "text": "很多", "image_ids": [0]}],
    )
    line = _error_line(capsys, _argv(d, "--lmdb-dir", old / "lmdb"))
    assert f"disk full at {old / 'lmdb'}" in line and not crashed
    assert _snapshot(old / "lmdb") == before and _leftovers(old / "lmdb") == []
