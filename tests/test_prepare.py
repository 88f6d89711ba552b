import base64
import csv
import io
import json
import os
import pickle
import subprocess
import sys

import lmdb
import pytest
from PIL import Image

import solution.data.make_lmdb as prep
import solution.data.workers as prep_workers
from solution.common import SolutionError, read_jsonl
from solution.data.lmdb_io import LMDBSplit, restricted_loads
from solution.data.make_lmdb import prepare
from solution.data.synthetic import generate
from solution.prepare import main


def _jpeg(color=(200, 40, 40), size=(40, 30), fmt="JPEG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _b64(data):
    return base64.urlsafe_b64encode(data).decode()


def _write_muge(d, split, images, texts):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{split}_imgs.tsv", "w", encoding="utf-8") as f:
        f.writelines(f"{image_id}\t{b64}\n" for image_id, b64 in images)
    with open(d / f"{split}_texts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    info = generate(d, preset="tiny")
    reports = prepare(d, "train,valid,test", workers=1, progress=False)
    return d, info, reports


def test_cn_clip_lmdbdataset_reads_our_lmdb(demo):
    from cn_clip.training.data import LMDBDataset

    d, info, reports = demo
    texts = read_jsonl(d / "train_texts.jsonl")
    bad = set(info["bad_image_ids"])
    expected_pairs = sum(1 for t in texts for i in t["image_ids"] if i not in bad)
    n_tsv = sum(1 for _ in open(d / "train_imgs.tsv"))
    ds = LMDBDataset(str(d / "lmdb" / "train"), split="train", max_txt_length=32, resolution=64)
    assert ds.number_samples == expected_pairs == reports["train"]["num_samples"]
    assert ds.number_images == n_tsv - len(bad & {int(line.split("\t")[0]) for line in open(d / "train_imgs.tsv")})
    seen_texts = set()
    for i in range(len(ds)):
        image, tokens, eos = ds[i]  # upstream decodes every stored image (GIF/PNG were converted)
        assert tuple(image.shape) == (3, 64, 64) and tokens.shape[0] == 32 and eos > 1
        seen_texts.add(pickle.loads(ds.txn_pairs.get(str(i).encode()).tobytes())[2])
    assert seen_texts == {t["text"] for t in texts}
    # test split: every image stored, no pairs (queries are unlabelled)
    test = LMDBSplit(d / "lmdb" / "test", need_pairs=True)
    assert test.num_samples == 0 and test.num_images == sum(1 for _ in open(d / "test_imgs.tsv"))
    assert reports["test"]["texts"]["unlabelled"] == len(read_jsonl(d / "test_texts.jsonl"))


def test_report_lists_each_bad_file_and_converted_ones(demo):
    d, info, reports = demo
    rep = json.loads((d / "lmdb" / "train" / "report.json").read_text(encoding="utf-8"))
    assert rep == json.loads(json.dumps(reports["train"]))
    kinds = {m["image_id"]: m["kind"] for m in info["messy"]["train"]}
    skipped = {s["image_id"]: s["reason"] for s in rep["skipped_images"]}
    want = {"truncated": "truncated", "html": "not_an_image"}
    assert skipped == {i: want[k] for i, k in kinds.items() if k in want}
    converted = {c["image_id"] for c in rep["converted_images"]}
    assert converted == {i for i, k in kinds.items() if k.startswith(("gif", "png"))}
    assert rep["images"]["kept"] + rep["images"]["converted"] == rep["num_images"]
    assert rep["images"]["skipped"] == 2 and rep["pairs"]["dropped_missing_image"] == 2
    missing = {i for t in rep["texts_with_missing_images"] for i in t["missing_image_ids"]}
    assert missing == set(skipped)
    split = LMDBSplit(d / "lmdb" / "train")
    for image_id in converted:
        assert Image.open(io.BytesIO(base64.urlsafe_b64decode(split.image_b64(image_id)))).format == "JPEG"
    assert all(split.image_b64(i) is None for i in skipped)


@pytest.mark.parametrize("workers", [1, 2])
def test_dirty_tsv_duplicates_and_textless_images(tmp_path, caplog, monkeypatch, workers):
    monkeypatch.setattr(prep, "MIN_PARALLEL_BYTES", 0)  # workers=2: texts read by a worker, pairs written again
    good, other = _b64(_jpeg()), _b64(_jpeg((0, 0, 200)))
    images = [
        (1, good),
        (2, _b64(b"<html>404</html>")),
        (3, "%%%not base64%%%"),
        (1, other),
        (4, ""),
        ("x7", good),
        (5, _b64(_jpeg(fmt="PNG"))),
    ]
    texts = [
        {"text_id": 10, "text": "红色的图片", "image_ids": [1, 5]},
        {"text_id": 11, "text": "坏图片", "image_ids": [2, 3]},  # all its images are bad
        {"text_id": 12, "text": "缺失的图片", "image_ids": [99]},  # image not in the TSV
        {"text_id": 10, "text": "重复的编号", "image_ids": [1]},  # duplicate text id
        {"text_id": 13, "text": "", "image_ids": [1]},
    ]
    _write_muge(tmp_path, "train", images, texts)
    with open(tmp_path / "train_imgs.tsv", "a", encoding="utf-8") as f:
        f.write("only-one-field\n")
    rep = prepare(tmp_path, ["train"], workers=workers, progress=False)["train"]
    reasons = {(s["image_id"], s["reason"]) for s in rep["skipped_images"]}
    assert reasons == {
        (2, "not_an_image"),
        (3, "invalid_base64"),
        (4, "empty"),
        (None, "bad_id"),
        (None, "malformed_line"),
    }
    assert [(x["image_id"], x["reason"]) for x in rep["duplicate_images"]] == [(1, "duplicate_id")]
    split = LMDBSplit(tmp_path / "lmdb" / "train")
    assert split.image_b64(1).decode() == good  # first one wins
    assert split.num_images == 2 and sorted(split.image_ids()) == [1, 5]
    skipped_texts = {(t["text_id"], t["reason"]) for t in rep["skipped_texts"]}
    assert skipped_texts == {(11, "no_images"), (12, "no_images"), (10, "duplicate_text_id"), (13, "empty_text")}
    assert list(split.queries()) == [10] and split.queries()[10] == ("红色的图片", [1, 5])
    assert any("train:" in r.message and "skipped" in r.message for r in caplog.records)


@pytest.mark.parametrize("workers", [1, 2])
def test_our_reader_reads_cn_clip_builder_output(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(prep, "MIN_PARALLEL_BYTES", 0)  # workers=2: the pairs are written by a worker
    images = [(100 + i, _b64(_jpeg((i * 40, 10, 10)))) for i in range(5)]
    texts = [
        {"text_id": 1, "text": "第一句", "image_ids": [100, 101]},
        {"text_id": 2, "text": "第二句", "image_ids": [102, 103, 104]},
    ]
    _write_muge(tmp_path, "train", images, texts)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cn_clip.preprocess.build_lmdb_dataset",
            "--data_dir",
            str(tmp_path),
            "--splits",
            "train",
            "--lmdb_dir",
            str(tmp_path / "upstream"),
        ],
        check=True,
        capture_output=True,
    )
    split = LMDBSplit(tmp_path / "upstream" / "train")
    assert split.num_images == 5 and split.num_samples == 5
    assert list(split.pairs()) == [
        (100, 1, "第一句"),
        (101, 1, "第一句"),
        (102, 2, "第二句"),
        (103, 2, "第二句"),
        (104, 2, "第二句"),
    ]
    assert {i: split.image_b64(i).decode() for i in split.image_ids()} == dict(images)
    # ...and ours over the same input matches it pair for pair and image for image
    prepare(tmp_path, ["train"], lmdb_dir=tmp_path / "ours", workers=workers, progress=False)
    ours = LMDBSplit(tmp_path / "ours" / "train")
    assert list(ours.pairs()) == list(split.pairs())
    assert {i: ours.image_b64(i) for i in ours.image_ids()} == {i: split.image_b64(i) for i in split.image_ids()}


def test_restricted_unpickler_refuses_a_malicious_pair(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    payload = pickle.dumps(Evil())
    with pytest.raises(SolutionError):
        restricted_loads(payload)
    with pytest.raises(SolutionError):
        restricted_loads(pickle.dumps((1, 2, ["not", "a", "str"])))
    # the same payload planted in an otherwise valid LMDB split
    prepare_dir = tmp_path / "d"
    _write_muge(prepare_dir, "train", [(1, _b64(_jpeg()))], [{"text_id": 1, "text": "好", "image_ids": [1]}])
    prepare(prepare_dir, ["train"], workers=1, progress=False)
    env = lmdb.open(str(prepare_dir / "lmdb" / "train" / "pairs"))
    with env.begin(write=True) as txn:
        txn.put(b"0", payload)
    env.close()
    split = LMDBSplit(prepare_dir / "lmdb" / "train")
    with pytest.raises(SolutionError, match="refusing"):
        split.pair(0)
    assert not marker.exists()


def _image_folder(root):
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.jpg").write_bytes(_jpeg((220, 20, 20)))
    (root / "imgs" / "b.jpg").write_bytes(_jpeg((20, 20, 220), fmt="PNG"))  # a PNG named .jpg
    (root / "imgs" / "c.jpg").write_bytes(b"<html><body>403 Forbidden</body></html>")
    (root / "imgs" / "d.jpg").write_bytes(_jpeg((20, 220, 20), fmt="GIF"))
    return [
        ("红色方块", "imgs/a.jpg", "train"),
        ("蓝色方块", "imgs/b.jpg", "train"),
        ("红色方块", "imgs/d.jpg", "train"),
        ("坏的", "imgs/c.jpg", "train"),
        ("不存在", "imgs/missing.jpg", "train"),
        ("绿色方块", "imgs/d.jpg", "valid"),
    ]


def _check_table_output(d, reports):
    assert reports["train"]["num_images"] == 3 and reports["valid"]["num_images"] == 1
    reasons = sorted(s["reason"] for s in reports["train"]["skipped_images"])
    assert reasons == ["missing_file", "not_an_image"]
    train = read_jsonl(d / "train_texts.jsonl")
    assert [t["text"] for t in train] == ["红色方块", "蓝色方块"]
    assert len(train[0]["image_ids"]) == 2
    tsv_ids = {int(line.split("\t")[0]) for line in open(d / "train_imgs.tsv")}
    assert tsv_ids == {i for t in train for i in t["image_ids"]}
    valid = read_jsonl(d / "valid_texts.jsonl")
    assert valid[0]["image_ids"] == [train[0]["image_ids"][1]]  # same file, same id across splits
    assert {t["text_id"] for t in train}.isdisjoint({t["text_id"] for t in valid})
    split = LMDBSplit(d / "lmdb" / "train")
    assert split.num_samples == 3 and {q[0] for q in split.queries().values()} == {"红色方块", "蓝色方块"}


def test_csv_input(tmp_path):
    rows = _image_folder(tmp_path / "raw")
    with open(tmp_path / "raw" / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "image_path", "split"])
        w.writerows(rows)
    out = tmp_path / "muge"
    reports = main(
        [
            "--data-dir",
            str(out),
            "--splits",
            "train,valid",
            "--csv",
            str(tmp_path / "raw" / "pairs.csv"),
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    _check_table_output(out, reports)


def test_folder_with_captions_input(tmp_path):
    rows = _image_folder(tmp_path / "raw")
    for split in ("train", "valid"):
        with open(tmp_path / f"captions_{split}.jsonl", "w", encoding="utf-8") as f:
            for text, path, s in rows:
                if s == split:
                    f.write(json.dumps({"image": path, "caption": text}, ensure_ascii=False) + "\n")
    out = tmp_path / "muge"
    reports = prepare(
        out,
        ["train", "valid"],
        images_dir=tmp_path / "raw",
        captions=str(tmp_path / "captions_{split}.jsonl"),
        workers=1,
        progress=False,
    )
    _check_table_output(out, reports)


def test_make_valid_splits_queries_apart(tmp_path):
    images = [(i, _b64(_jpeg((i * 9 % 255, 0, 0)))) for i in range(1, 41)]
    texts = [{"text_id": 100 + q, "text": f"查询{q % 10}", "image_ids": [q * 2 + 1, q * 2 + 2]} for q in range(20)]
    _write_muge(tmp_path, "train", images, texts)
    reports = prepare(tmp_path, "train", make_valid=0.3, workers=1, progress=False)
    train, valid = LMDBSplit(tmp_path / "lmdb" / "train"), LMDBSplit(tmp_path / "lmdb" / "valid")
    tq = {t for t, _ in train.queries().values()}
    vq = {t for t, _ in valid.queries().values()}
    assert tq and vq and not tq & vq and len(tq | vq) == 10  # the same text never lands on both sides
    assert train.num_samples + valid.num_samples == 40
    assert set(valid.image_ids()) == {i for _, ids in valid.queries().values() for i in ids}
    assert set(train.image_ids()).isdisjoint(valid.image_ids())
    assert reports["valid"]["num_images"] == valid.num_images
    with pytest.raises(SolutionError):
        prepare(tmp_path, "train", make_valid=1.5, workers=1, progress=False)


def test_texts_read_by_a_worker_report_the_same(tmp_path, monkeypatch):
    """All images survive, so the pairs a worker wrote before the images were known stand; the
    texts' problems it found reach the report as they do in-process."""
    images = [(100 + i, _b64(_jpeg((i * 40, 10, 10)))) for i in range(4)]
    texts = [
        {"text_id": 1, "text": "第一句", "image_ids": [100, 101]},
        {"text_id": 1, "text": "重复", "image_ids": [102]},
        {"text_id": 2, "text": "无标注"},
        {"text_id": 3, "text": "  ", "image_ids": [103]},
        {"text_id": 4, "text": "第四句", "image_ids": [103, 102]},
    ]
    _write_muge(tmp_path, "train", images, texts)
    with open(tmp_path / "train_texts.jsonl", "a", encoding="utf-8") as f:
        f.write("{not json\n\n")
    monkeypatch.setattr(prep, "MIN_PARALLEL_BYTES", 0)
    reps = [
        prepare(tmp_path, ["train"], lmdb_dir=tmp_path / str(w), workers=w, progress=False)["train"] for w in (1, 2)
    ]
    for key in ("num_images", "num_samples", "texts", "skipped_texts", "pairs"):
        assert reps[0][key] == reps[1][key], key
    assert reps[1]["texts"] == {"total": 6, "kept": 2, "unlabelled": 1, "skipped": 3, "with_missing_images": 0}
    assert {(t["reason"], t["where"]) for t in reps[1]["skipped_texts"]} == {
        ("duplicate_text_id", "train_texts.jsonl:2"),
        ("empty_text", "train_texts.jsonl:4"),
        ("malformed", "train_texts.jsonl:6"),
    }
    a, b = LMDBSplit(tmp_path / "1" / "train"), LMDBSplit(tmp_path / "2" / "train")
    assert (
        list(a.pairs())
        == list(b.pairs())
        == [(100, 1, "第一句"), (101, 1, "第一句"), (103, 4, "第四句"), (102, 4, "第四句")]
    )


def test_parallel_matches_in_process_and_resizes(tmp_path, monkeypatch):
    d = tmp_path / "demo"
    generate(d, preset="tiny")
    monkeypatch.setattr(prep, "MIN_PARALLEL", 0)
    monkeypatch.setattr(prep, "MIN_PARALLEL_BYTES", 0)
    serial = prepare(d, "train", lmdb_dir=tmp_path / "a", workers=1, max_side=32, progress=False)["train"]
    parallel = prepare(d, "train", lmdb_dir=tmp_path / "b", workers=2, max_side=32, progress=False)["train"]
    for key in ("num_images", "num_samples", "images", "skipped_images", "texts"):
        assert serial[key] == parallel[key]
    a, b = LMDBSplit(tmp_path / "a" / "train"), LMDBSplit(tmp_path / "b" / "train")
    assert list(a.pairs()) == list(b.pairs())
    assert all(a.image_b64(i) == b.image_b64(i) for i in a.image_ids())
    im = Image.open(io.BytesIO(base64.urlsafe_b64decode(a.image_b64(a.image_ids()[0]))))
    assert im.size == (32, 32) and im.format == "JPEG"
    assert serial["images"]["converted"] == serial["num_images"]  # every image shrunk and re-encoded


def test_many_blocks_in_parallel_write_the_same_bytes_as_in_process(tmp_path, monkeypatch):
    """The first block is checked by the parent (which imports PIL for its conversions before the workers
    fork), the rest by the workers: the LMDB files are the very bytes an in-process run writes."""
    d = tmp_path / "demo"
    generate(d, preset="tiny")  # messy images included: some lines are converted
    monkeypatch.setattr(prep, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(prep_workers, "TSV_BLOCK", 4096)  # many blocks
    serial = prepare(d, "train", lmdb_dir=tmp_path / "a", workers=1, progress=False)["train"]
    parallel = prepare(d, "train", lmdb_dir=tmp_path / "b", workers=2, progress=False)["train"]
    assert serial["images"]["converted"] > 0 and serial["images"] == parallel["images"]
    for name in ("imgs", "pairs"):
        assert (tmp_path / "a" / "train" / name / "data.mdb").read_bytes() == (
            tmp_path / "b" / "train" / name / "data.mdb"
        ).read_bytes(), name


def test_keyed_images_and_exact_pairs_write_the_same_bytes(tmp_path):
    from solution.data.lmdb_io import write_images, write_pairs

    images = [(7, b"aGVsbG8="), (12, "d29ybGQ="), (3, bytearray(b"eA=="))]
    pairs = [(7, 1, "一"), (12, 2, "二"), (3, 2, "二")]
    assert (
        write_images(tmp_path / "a", images)
        == write_images(
            tmp_path / "b", [(b"%d" % i, d.encode() if isinstance(d, str) else d) for i, d in images], keyed=True
        )
        == 3
    )
    assert write_pairs(tmp_path / "a", pairs) == write_pairs(tmp_path / "b", iter(pairs), exact=True) == 3
    for name in ("imgs", "pairs"):
        assert (tmp_path / "a" / name / "data.mdb").read_bytes() == (tmp_path / "b" / name / "data.mdb").read_bytes()


def test_rebuild_replaces_old_lmdb_and_bad_inputs_are_one_line_errors(tmp_path):
    _write_muge(tmp_path, "train", [(1, _b64(_jpeg()))], [{"text_id": 1, "text": "一", "image_ids": [1]}])
    prepare(tmp_path, "train", workers=1, progress=False)
    _write_muge(tmp_path, "train", [(2, _b64(_jpeg()))], [{"text_id": 2, "text": "二", "image_ids": [2]}])
    main(["--data_dir", str(tmp_path), "--splits", "train", "--workers", "0", "--no-progress"])  # upstream's spelling
    assert LMDBSplit(tmp_path / "lmdb" / "train").image_ids() == [2]
    assert [p.name for p in (tmp_path / "lmdb").glob(".*")] == [".train.lock"]  # no temp dirs left behind
    with pytest.raises(SolutionError, match="valid_imgs.tsv"):
        prepare(tmp_path, "train,valid", workers=1, progress=False)
    with pytest.raises(SolutionError, match="not a directory"):
        prepare(tmp_path / "nope", "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(SolutionError, match="text and image_path"):
        prepare(tmp_path / "out", "train", csv=tmp_path / "bad" / "x.csv")


def _noisy_jpeg(seed, size=(48, 40), **kw):
    import numpy as np

    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_plain_lines_stream_through_and_every_check_agrees(tmp_path, monkeypatch):
    """Small blocks over two workers: plain lines (standard or URL-safe base64, CRLF) go straight to
    LMDB, everything else through the full path; both checks and the in-process path agree."""
    good = [_noisy_jpeg(i) for i in range(6)]
    cut = good[5][: len(good[5]) - 200]
    rows = [
        b"1\t" + base64.urlsafe_b64encode(good[0]),
        b"2\t" + base64.b64encode(good[1]),
        b"3\t" + base64.urlsafe_b64encode(good[2]) + b"\r",  # CRLF
        b"004\t" + base64.urlsafe_b64encode(good[3]),  # id not canonical
        b"",  # blank
        b"5\t" + base64.urlsafe_b64encode(_noisy_jpeg(9, progressive=True)),
        b"6\t" + base64.urlsafe_b64encode(cut),  # truncated
        b"7\t" + base64.urlsafe_b64encode(_jpeg(fmt="PNG")),  # converted
        b"8\t" + base64.urlsafe_b64encode(good[4])[:50] + b"*" + base64.urlsafe_b64encode(good[4])[51:],
        b"2\t" + base64.urlsafe_b64encode(good[0]),
    ]  # duplicate id
    d = tmp_path / "d"
    d.mkdir()
    (d / "train_imgs.tsv").write_bytes(b"\n".join(rows) + b"\n")
    (d / "train_texts.jsonl").write_text(
        "".join(json.dumps({"text_id": i, "text": f"t{i}", "image_ids": [i]}) + "\n" for i in range(1, 9)),
        encoding="utf-8",
    )
    prep_workers.init_worker({"check": "structural"})
    block = b"\n".join(rows) + b"\n"
    blk = prep_workers.check_tsv_block(block, offset=7)
    special = blk.special
    assert sorted(special) == [3, 4, 6, 7, 8]  # only these travel back from a worker (line j of the block)
    assert special[4] is None and special[3][1] == 4 and special[6][3] == "truncated"
    # of the plain lines only the id and where the base64 lies (CR excluded) travel back
    assert blk.lines == 10 and list(blk.ids) == [1, 2, 3, 5, 2] and list(blk.js) == [0, 1, 2, 5, 9]
    assert [block[a - 7 : b - 7] for a, b in zip(blk.starts, blk.stops)] == [
        rows[j].split(b"\t")[1].rstrip(b"\r") for j in blk.js
    ]
    monkeypatch.setattr(prep, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(prep_workers, "TSV_BLOCK", 1500)  # about one line per block
    runs = {
        name: prepare(d, "train", lmdb_dir=tmp_path / name, workers=w, check=c, progress=False)["train"]
        for name, w, c in [("structural", 2, "structural"), ("full", 2, "full"), ("serial", 1, "structural")]
    }
    for name, rep in runs.items():
        assert {(s["image_id"], s["reason"]) for s in rep["skipped_images"]} == {
            (6, "truncated"),
            (8, "invalid_base64"),
        }, name
        assert [(x["image_id"], x["where"]) for x in rep["duplicate_images"]] == [(2, "line 10")], name
        assert rep["images"]["kept"] == 5 and rep["images"]["converted"] == 1, name
        split = LMDBSplit(tmp_path / name / "train")
        assert sorted(split.image_ids()) == [1, 2, 3, 4, 5, 7], name
        assert split.image_b64(1) == base64.urlsafe_b64encode(good[0])  # byte for byte
        assert split.image_b64(2) == base64.b64encode(good[1])  # standard alphabet: cn_clip reads it as is
        assert split.image_b64(3) == base64.urlsafe_b64encode(good[2])  # no CR
        assert base64.urlsafe_b64decode(split.image_b64(4)) == good[3]
        assert split.num_samples == 6
