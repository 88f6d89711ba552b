"""``python -m solution.prepare`` under hostile inputs and faults: one ``error:`` line, inputs left untouched."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import snapshot
from PIL import Image
from test_prepare import _b64, _jpeg, _write_muge
from train_helpers import error_line

from solution.common import folder_lock, run_cli
from solution.data.inputs import Text, split_off_valid
from solution.data.lmdb_io import LMDBSplit
from solution.prepare import main


def _argv(data_dir, *extra, splits="train"):
    return ["--data-dir", str(data_dir), "--splits", splits, "--no-progress", *map(str, extra)]


def _queries(split_dir: Path) -> dict:
    return {text: ids for text, ids in LMDBSplit(split_dir).queries().values()}


def _leftovers(lmdb_dir: Path) -> list[str]:
    """What a run leaves in ``lmdb_dir`` besides the splits and their lock files."""
    return sorted(p.name for p in lmdb_dir.glob(".*") if not p.name.endswith(".lock"))


OLD = {"红色": [1], "蓝色": [2]}


@pytest.fixture
def old(tmp_path):
    """A MUGE folder and the LMDB a first prepare built from it (the "previous LMDB")."""
    d = _write_muge(
        tmp_path / "muge",
        "train",
        [(1, _b64(_jpeg())), (2, _b64(_jpeg((0, 0, 200))))],
        [{"text_id": 1, "text": "红色", "image_ids": [1]}, {"text_id": 2, "text": "蓝色", "image_ids": [2]}],
    )
    assert run_cli(main, _argv(d)) == 0 and _queries(d / "lmdb" / "train") == OLD
    return d


def test_a_split_in_use_is_refused_naming_the_holder(old, capsys):
    lmdb_dir = old / "lmdb"
    with folder_lock(lmdb_dir / ".train.lock", "LMDB split"):
        line = error_line(capsys, _argv(old), main)
    assert f"pid {os.getpid()}" in line and str(lmdb_dir / "train") in line and "in use" in line
    assert _queries(lmdb_dir / "train") == OLD and _leftovers(lmdb_dir) == []


def test_a_run_killed_mid_way_keeps_the_old_lmdb_and_the_next_run_cleans_up(old, tmp_path):
    """Killed while it builds (its one image is a FIFO nobody writes), it leaves its temp folder only."""
    raw, lmdb_dir = tmp_path / "raw", old / "lmdb"
    raw.mkdir()
    os.mkfifo(raw / "new.jpg")
    (raw / "caps.jsonl").write_text(json.dumps({"image": "new.jpg", "text": "新的"}) + "\n", encoding="utf-8")
    argv = _argv(tmp_path / "a", "--lmdb-dir", lmdb_dir, "--images-dir", raw, "--captions", raw / "caps.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "solution.prepare", *argv], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(lmdb_dir.glob(".train.building*")):
        if proc.poll() is not None or time.time() > deadline:  # killed first: communicate() would wait for ever
            proc.kill()
            pytest.fail(f"no temp folder: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _queries(lmdb_dir / "train") == OLD and len(_leftovers(lmdb_dir)) == 1  # its temp folder
    assert run_cli(main, _argv(old)) == 0  # the kernel dropped its lock; its temp folder goes
    assert _leftovers(lmdb_dir) == [] and _queries(lmdb_dir / "train") == OLD


def test_a_split_left_mid_swap_by_a_killed_run_is_put_back(old, capsys):
    """Killed between its renames, a run leaves ``.train.old`` and no ``train``: the next run puts it back first."""
    lmdb_dir = old / "lmdb"
    (lmdb_dir / "train").rename(lmdb_dir / ".train.old")
    (old / "train_imgs.tsv").write_text("1\tnot base64!\n2\tnot base64!\n", encoding="utf-8")  # this run fails, later
    assert "without a single pair" in error_line(capsys, _argv(old, "--make-valid", "0.5", splits="train,valid"), main)
    assert _queries(lmdb_dir / "train") == OLD and _leftovers(lmdb_dir) == []


def _csv_input(root: Path, body: str = "红色,imgs/a.jpg\n蓝色,imgs/b.jpg\n", name: str = "pairs.csv") -> Path:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "imgs" / "a.jpg").write_bytes(_jpeg())
    (root / "imgs" / "b.jpg").write_bytes(_jpeg((0, 0, 200)))
    (root / name).write_text(("text\timage_path\n" if name.endswith(".tsv") else "text,image_path\n") + body, "utf-8")
    return root / name


@pytest.mark.parametrize("present", ["both", "texts"])
def test_csv_never_overwrites_the_users_muge_files(old, tmp_path, capsys, present):
    csv = _csv_input(tmp_path / "raw")
    if present == "texts":
        (old / "train_imgs.tsv").unlink()
    before = snapshot(old)
    line = error_line(capsys, _argv(old, "--csv", csv), main)
    assert str(old / ("train_imgs.tsv" if present == "both" else "train_texts.jsonl")) in line
    assert "not an earlier output" in line and snapshot(old) == before  # not even a lock file


def test_csv_replaces_its_own_muge_files_but_not_once_the_user_changed_them(tmp_path, capsys):
    csv, out = _csv_input(tmp_path / "raw"), tmp_path / "out"
    assert run_cli(main, _argv(out, "--csv", csv)) == 0
    csv.write_text("text,image_path\n红色,imgs/a.jpg\n", encoding="utf-8")
    assert run_cli(main, _argv(out, "--csv", csv)) == 0  # its own output: replaced
    assert len((out / "train_texts.jsonl").read_text(encoding="utf-8").splitlines()) == 1
    with open(out / "train_texts.jsonl", "a", encoding="utf-8") as f:  # now the user's edit
        f.write(json.dumps({"text_id": 9, "text": "手写", "image_ids": [1]}) + "\n")
    before = snapshot(out)
    assert "train_texts.jsonl" in error_line(capsys, _argv(out, "--csv", csv), main) and snapshot(out) == before


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
    table = _csv_input(tmp_path / "raw", body, name)
    err = error_line(capsys, _argv(tmp_path / "out", "--csv", table), main)
    assert f"{table}:{line}:" in err and what in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_csv_caption_over_two_lines_is_still_read(tmp_path, eol):
    table = _csv_input(tmp_path / "raw")
    table.write_bytes('text,image_path\n"第一行\n第二行",imgs/a.jpg\n蓝色,imgs/b.jpg\n'.replace("\n", eol).encode())
    reports = main(_argv(tmp_path / "out", "--csv", table))
    assert reports["train"]["num_samples"] == 2 and reports["train"]["texts"]["skipped"] == 0


@pytest.mark.parametrize("kind", ["texts", "csv", "captions"])
def test_non_utf8_text_names_file_and_line(old, tmp_path, capsys, kind):
    gbk = "蓝色".encode("gbk")
    if kind == "texts":
        table, extra = old / "train_texts.jsonl", []
        table.write_bytes(table.read_bytes().splitlines(keepends=True)[0] + b'{"text_id": 2, "text": "' + gbk + b'"}\n')
    elif kind == "csv":
        table = _csv_input(tmp_path / "raw", "红色,imgs/a.jpg\n" + "x" * 9 + ",imgs/b.jpg\n")
        table.write_bytes(table.read_bytes().replace(b"x" * 9, gbk))
        extra = ["--csv", table]
    else:
        table = tmp_path / "raw" / "caps.jsonl"
        _csv_input(tmp_path / "raw")
        table.write_bytes(b'{"image": "imgs/a.jpg", "text": "a"}\n{"image": "imgs/b.jpg", "text": "' + gbk + b'"}\n')
        extra = ["--images-dir", tmp_path / "raw", "--captions", table]
    before = snapshot(old, tmp_path)
    line = error_line(capsys, _argv(old if kind == "texts" else tmp_path / "out", *extra), main)
    assert f"{table}:{3 if kind == 'csv' else 2}: not UTF-8" in line and snapshot(old, tmp_path) == before


@pytest.mark.parametrize(
    "data, flags, want",  # {d}: the MUGE folder; {b}: a user's file; {o}/train: a file; {p}/train: a user's folder
    [
        ("{d}", "--lmdb-dir {b}", "--lmdb-dir {b} is a file"),
        ("{d}", "--lmdb-dir {b}/lmdb", "sits under {b}"),
        ("{d}", "--lmdb-dir {o}", "{o}/train is a file"),
        ("{d}", "--lmdb-dir {p}", "holiday.jpg: not an LMDB split"),
        ("{b}", "--csv {c}", "--data-dir {b} is a file"),
    ],
)
def test_output_that_cannot_be_written_is_one_line_and_nothing_is_written(old, tmp_path, capsys, data, flags, want):
    blocker, out, photos = tmp_path / "blocker", tmp_path / "out", tmp_path / "photos"
    (photos / "train").mkdir(parents=True)
    (photos / "train" / "holiday.jpg").write_bytes(_jpeg())
    out.mkdir()
    for file in (blocker, out / "train"):
        file.write_text("mine\n", encoding="utf-8")
    paths = dict(d=old, b=blocker, o=out, p=photos, c=_csv_input(tmp_path / "raw"))
    before = snapshot(old, tmp_path)
    line = error_line(capsys, _argv(data.format(**paths), *flags.format(**paths).split()), main)
    assert want.format(**paths) in line and snapshot(old, tmp_path) == before  # not even a lock file


def _queries_tsv(d: Path, n: int, bad=()) -> Path:
    return _write_muge(
        d,
        "train",
        [(i, "not base64!" if i in bad else _b64(_jpeg())) for i in range(1, n + 1)],
        [{"text_id": 100 + i, "text": f"查询{i}", "image_ids": [i]} for i in range(1, n + 1)],
    )


def _valid_image_ids(text_ids) -> list[int]:
    """The image ids of the queries ``--make-valid 0.5`` (seed 0) puts into valid (query i has image i)."""
    return [
        t.image_ids[0]
        for t in split_off_valid([Text(t, f"查询{i}", [i]) for i, t in enumerate(text_ids, 1)], 0.5, 0)[1]
    ]


@pytest.mark.parametrize(
    "case", ["everything", "one_query", "valid_name_is_the_split", "valid_images_all_bad", "csv_valid_images_all_bad"]
)
def test_make_valid_that_leaves_an_empty_split_is_refused(tmp_path, capsys, case):
    fraction, extra, d, want = "0.5", [], tmp_path / "d", "split 'valid' without a single pair"
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
    else:  # a CSV run wrote LMDBs and MUGE files; then valid's image went bad: all of them stay as they were
        table = _csv_input(tmp_path / "raw", "查询1,imgs/a.jpg\n查询2,imgs/b.jpg\n")
        extra = ["--csv", table]
        assert run_cli(main, _argv(d, "--make-valid", fraction, *extra, splits="train,valid")) == 0
        for i in _valid_image_ids([1, 2]):
            (tmp_path / "raw" / "imgs" / f"{'ab'[i - 1]}.jpg").write_bytes(b"<html>gone</html>")
    before = snapshot(d, locks=False)
    assert want in error_line(capsys, _argv(d, "--make-valid", fraction, *extra, splits="train,valid"), main)
    assert snapshot(d, locks=False) == before  # nothing written (a lock file at most)
    assert not (d / "lmdb").exists() or _leftovers(d / "lmdb") == []


def test_disk_full_while_writing_an_lmdb_keeps_the_previous_one(old, small_disk, tmp_path, capsys):
    lmdb_dir = small_disk(1) / "lmdb"
    assert run_cli(main, _argv(old, "--lmdb-dir", lmdb_dir)) == 0  # the previous LMDB: small, it fits
    before = snapshot(lmdb_dir)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=95
    )
    big = _b64(buf.getvalue())
    n = 2 * (1 << 20) // len(big) + 1  # 2 MiB of images for a 1 MiB disk
    d = _write_muge(
        tmp_path / "big", "train", [(i, big) for i in range(n)], [{"text_id": 1, "text": "噪声", "image_ids": [0]}]
    )
    assert f"disk full at {lmdb_dir}" in error_line(capsys, _argv(d, "--lmdb-dir", lmdb_dir), main)
    assert snapshot(lmdb_dir) == before and _leftovers(lmdb_dir) == [] and _queries(lmdb_dir / "train") == OLD
