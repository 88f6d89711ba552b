"""``python -m solution.prepare`` end to end: cn_clip's layout both ways, the report, MUGE files and tables."""

import base64
import csv
import io
import json
import os
import pickle

import lmdb
import pytest
from PIL import Image

from cn_clip_patch.device import run_upstream_main
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
    (d / f"{split}_imgs.tsv").write_text("".join(f"{i}\t{b}\n" for i, b in images), encoding="utf-8")
    (d / f"{split}_texts.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), "utf-8")
    return d


def _upstream_build(data_dir, lmdb_dir):
    argv = ["--data_dir", data_dir, "--lmdb_dir", lmdb_dir, "--splits", "train"]
    run_upstream_main("cn_clip.preprocess.build_lmdb_dataset", argv)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The tiny demo data (messy images included), prepared."""
    d = tmp_path_factory.mktemp("demo")
    info = generate(d, preset="tiny")
    prepare(d, "train,valid,test", progress=False)
    return d, info


def test_cn_clip_reads_our_lmdb(demo):
    from cn_clip.training.data import LMDBDataset

    d, info = demo
    texts, bad = read_jsonl(d / "train_texts.jsonl"), set(info["bad_image_ids"])
    tsv_ids = {int(line.split("\t")[0]) for line in open(d / "train_imgs.tsv")}
    ds = LMDBDataset(str(d / "lmdb" / "train"), split="train", max_txt_length=32, resolution=64)
    assert ds.number_samples == sum(1 for t in texts for i in t["image_ids"] if i not in bad)
    assert ds.number_images == len(tsv_ids - bad)
    seen = set()
    for i in range(len(ds)):
        image, tokens, eos = ds[i]  # upstream decodes every stored image (GIF/PNG were converted)
        assert tuple(image.shape) == (3, 64, 64) and tokens.shape[0] == 32 and eos > 1
        seen.add(pickle.loads(ds.txn_pairs.get(str(i).encode()).tobytes())[2])
    assert seen == {t["text"] for t in texts}
    test = LMDBSplit(d / "lmdb" / "test")  # test: every image stored, no pairs (its queries are unlabelled)
    assert test.num_samples == 0 and test.num_images == sum(1 for _ in open(d / "test_imgs.tsv"))


def test_report_lists_each_bad_file_and_converted_ones(demo):
    d, info = demo
    rep = json.loads((d / "lmdb" / "train" / "report.json").read_text(encoding="utf-8"))
    kinds = {m["image_id"]: m["kind"] for m in info["messy"]["train"]}
    skipped = {s["image_id"]: s["reason"] for s in rep["skipped_images"]}
    assert skipped == {
        i: {"truncated": "truncated", "html": "not_an_image"}[k] for i, k in kinds.items() if k in ("truncated", "html")
    }
    converted = {c["image_id"] for c in rep["converted_images"]}
    assert converted == {i for i, k in kinds.items() if k.startswith(("gif", "png"))}
    assert rep["images"]["kept"] + rep["images"]["converted"] == rep["num_images"]
    assert rep["pairs"]["dropped_missing_image"] == 2
    assert {i for t in rep["texts_with_missing_images"] for i in t["missing_image_ids"]} == set(skipped)
    split = LMDBSplit(d / "lmdb" / "train")
    assert all(Image.open(io.BytesIO(base64.urlsafe_b64decode(split.image_b64(i)))).format == "JPEG" for i in converted)
    assert all(split.image_b64(i) is None for i in skipped)


def test_upstreams_builder_and_ours_write_the_same_splits(tmp_path):
    images = [(100 + i, _b64(_jpeg((i * 40, 10, 10)))) for i in range(5)]
    texts = [
        {"text_id": 1, "text": "第一句", "image_ids": [100, 101]},
        {"text_id": 2, "text": "第二句", "image_ids": [102, 103, 104]},
    ]
    _write_muge(tmp_path, "train", images, texts)
    _upstream_build(tmp_path, tmp_path / "upstream")
    theirs = LMDBSplit(tmp_path / "upstream" / "train")
    assert list(theirs.pairs()) == [(i, t["text_id"], t["text"]) for t in texts for i in t["image_ids"]]
    assert {i: theirs.image_b64(i).decode() for i in theirs.image_ids()} == dict(images)
    prepare(tmp_path, ["train"], lmdb_dir=tmp_path / "ours", progress=False)
    for sub in ("imgs", "pairs"):  # key for key, value for value
        with (
            lmdb.open(str(tmp_path / "ours" / "train" / sub), readonly=True) as a,
            lmdb.open(str(tmp_path / "upstream" / "train" / sub), readonly=True) as b,
        ):
            with a.begin() as ta, b.begin() as tb:
                assert list(ta.cursor()) == list(tb.cursor()), sub


def test_restricted_unpickler_refuses_a_malicious_pair(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with pytest.raises(SolutionError):
        restricted_loads(pickle.dumps((1, 2, ["not", "a", "str"])))
    _write_muge(tmp_path, "train", [(1, _b64(_jpeg()))], [{"text_id": 1, "text": "好", "image_ids": [1]}])
    prepare(tmp_path, ["train"], progress=False)
    with lmdb.open(str(tmp_path / "lmdb" / "train" / "pairs")) as env, env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(Evil()))  # planted in an otherwise valid split
    with pytest.raises(SolutionError, match="refusing"):
        LMDBSplit(tmp_path / "lmdb" / "train").pair(0)
    assert not marker.exists()


@pytest.mark.parametrize("check", ["structural", "full"])
def test_every_line_of_a_dirty_tsv_is_stored_or_reported(tmp_path, check):
    good = [_jpeg((i * 40, 10, 10)) for i in range(5)]
    lines = [
        b"1\t" + base64.urlsafe_b64encode(good[0]),
        b"2\t" + base64.b64encode(good[1]),  # standard alphabet: kept as it is (cn_clip reads it)
        b"3\t" + base64.urlsafe_b64encode(good[2]) + b"\r",  # CRLF
        b"004\t" + base64.urlsafe_b64encode(good[3]),  # an id not written canonically
        b"",
        b"5\t" + base64.urlsafe_b64encode(_jpeg(fmt="PNG")),  # converted
        b"6\t" + base64.urlsafe_b64encode(good[4][:-200]),  # truncated
        b"7\t%%%not base64%%%",
        b"8\t",
        b"9\t" + base64.urlsafe_b64encode(b"<html>404</html>"),
        b"1\t" + base64.urlsafe_b64encode(good[1]),  # a repeated id: the first one wins
        b"x7\t" + base64.urlsafe_b64encode(good[0]),
        b"only-one-field",
    ]
    texts = [
        {"text_id": 10, "text": "红色的图片", "image_ids": [1, 5]},
        {"text_id": 11, "text": "坏图片", "image_ids": [6, 7]},  # all its images are bad
        {"text_id": 12, "text": "缺失的图片", "image_ids": [99, 2]},  # one image not in the TSV
        {"text_id": 10, "text": "重复的编号", "image_ids": [1]},
        {"text_id": 13, "text": "", "image_ids": [1]},
        {"text_id": 14, "text": "无标注"},
    ]
    _write_muge(tmp_path, "train", [], texts)
    (tmp_path / "train_imgs.tsv").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    with open(tmp_path / "train_texts.jsonl", "a", encoding="utf-8") as f:
        f.write("{not json\n")
    rep = prepare(tmp_path, ["train"], check=check, progress=False)["train"]
    skipped = {(s["image_id"], s["reason"], s["where"]) for s in rep["skipped_images"]}
    assert skipped == {
        (6, "truncated", "line 7"),
        (7, "invalid_base64", "line 8"),
        (8, "empty", "line 9"),
        (9, "not_an_image", "line 10"),
        (None, "bad_id", "line 12"),
        (None, "malformed_line", "line 13"),
    }
    assert [(x["image_id"], x["where"]) for x in rep["duplicate_images"]] == [(1, "line 11")]
    assert rep["images"]["kept"] == 4 and rep["images"]["converted"] == 1
    split = LMDBSplit(tmp_path / "lmdb" / "train")
    assert [split.image_b64(i) for i in (1, 2, 3)] == [lines[0][2:], lines[1][2:], lines[2][2:-1]]  # byte for byte
    assert base64.urlsafe_b64decode(split.image_b64(4)) == good[3] and sorted(split.image_ids()) == [1, 2, 3, 4, 5]
    skipped = {(t["text_id"], t["reason"]) for t in rep["skipped_texts"]}
    assert skipped == {(11, "no_images"), (10, "duplicate_text_id"), (13, "empty_text"), (None, "malformed")}
    assert rep["texts"] == {"total": 7, "kept": 2, "unlabelled": 1, "skipped": 4, "with_missing_images": 1}
    assert dict(split.queries()) == {10: ("红色的图片", [1, 5]), 12: ("缺失的图片", [2])}


def test_max_side_shrinks_and_reencodes_every_image(demo, tmp_path):
    rep = prepare(demo[0], "train", lmdb_dir=tmp_path, max_side=32, quality=80, progress=False)["train"]
    assert rep["images"]["converted"] == rep["num_images"] > 0 and rep["images"]["kept"] == 0
    small = LMDBSplit(tmp_path / "train")
    for i in small.image_ids():
        im = Image.open(io.BytesIO(base64.urlsafe_b64decode(small.image_b64(i))))
        assert im.format == "JPEG" and im.size == (32, 32)


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


@pytest.mark.parametrize("kind", ["csv", "captions"])
def test_csv_and_caption_folder_inputs(tmp_path, kind):
    rows, raw, out = _image_folder(tmp_path / "raw"), tmp_path / "raw", tmp_path / "muge"
    argv = ["--data-dir", str(out), "--splits", "train,valid", "--no-progress"]
    if kind == "csv":
        with open(raw / "pairs.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "image_path", "split"), *rows])
        reports = main([*argv, "--csv", str(raw / "pairs.csv")])
    else:
        for split in ("train", "valid"):
            caps = [json.dumps({"image": p, "caption": t}, ensure_ascii=False) + "\n" for t, p, s in rows if s == split]
            (tmp_path / f"captions_{split}.jsonl").write_text("".join(caps), encoding="utf-8")
        reports = main([*argv, "--images-dir", str(raw), "--captions", str(tmp_path / "captions_{split}.jsonl")])
    assert reports["train"]["num_images"] == 3 and reports["valid"]["num_images"] == 1
    assert sorted(s["reason"] for s in reports["train"]["skipped_images"]) == ["missing_file", "not_an_image"]
    train, valid = read_jsonl(out / "train_texts.jsonl"), read_jsonl(out / "valid_texts.jsonl")
    assert [t["text"] for t in train] == ["红色方块", "蓝色方块"] and len(train[0]["image_ids"]) == 2
    tsv_ids = {int(line.split("\t")[0]) for line in open(out / "train_imgs.tsv")}
    assert tsv_ids == {i for t in train for i in t["image_ids"]}
    assert valid[0]["image_ids"] == [train[0]["image_ids"][1]]  # the same file has the same id in every split
    assert {t["text_id"] for t in train}.isdisjoint({t["text_id"] for t in valid})
    split = LMDBSplit(out / "lmdb" / "train")
    assert split.num_samples == 3 and {q[0] for q in split.queries().values()} == {"红色方块", "蓝色方块"}
    _upstream_build(out, out / "upstream")  # the MUGE files written are upstream's input as well
    assert LMDBSplit(out / "upstream" / "train").num_images == 3


def test_make_valid_splits_queries_apart(tmp_path):
    images = [(i, _b64(_jpeg((i * 9 % 255, 0, 0)))) for i in range(1, 42)]  # 41: stored, named by no text
    texts = [{"text_id": 100 + q, "text": f"查询{q % 10}", "image_ids": [q * 2 + 1, q * 2 + 2]} for q in range(20)]
    _write_muge(tmp_path, "train", images, texts)
    reports = prepare(tmp_path, "train", make_valid=0.3, progress=False)
    train, valid = LMDBSplit(tmp_path / "lmdb" / "train"), LMDBSplit(tmp_path / "lmdb" / "valid")
    tq, vq = ({t for t, _ in s.queries().values()} for s in (train, valid))
    assert tq and vq and not tq & vq and len(tq | vq) == 10  # the same text never lands on both sides
    assert train.num_samples + valid.num_samples == 40
    assert set(valid.image_ids()) == {i for _, ids in valid.queries().values() for i in ids}
    assert set(train.image_ids()) == set(range(1, 42)) - set(valid.image_ids())
    assert reports["valid"]["num_images"] == valid.num_images
    assert reports["valid"]["source"] == "muge, --make-valid from train"
    with pytest.raises(SolutionError):
        prepare(tmp_path, "train", make_valid=1.5, progress=False)


def test_rebuild_replaces_old_lmdb_and_bad_inputs_are_one_line_errors(tmp_path):
    _write_muge(tmp_path, "train", [(1, _b64(_jpeg()))], [{"text_id": 1, "text": "一", "image_ids": [1]}])
    prepare(tmp_path, "train", progress=False)
    _write_muge(tmp_path, "train", [(2, _b64(_jpeg()))], [{"text_id": 2, "text": "二", "image_ids": [2]}])
    with pytest.raises(SolutionError, match="--workers is gone"):
        main(["--data-dir", str(tmp_path), "--splits", "train", "--workers", "2"])
    main(["--data_dir", str(tmp_path), "--splits", "train", "--no-progress"])  # upstream's spelling
    assert LMDBSplit(tmp_path / "lmdb" / "train").image_ids() == [2]
    assert [p.name for p in (tmp_path / "lmdb").glob(".*")] == [".train.lock"]  # no temp dirs left behind
    with pytest.raises(SolutionError, match="valid_imgs.tsv"):
        prepare(tmp_path, "train,valid", progress=False)
    with pytest.raises(SolutionError, match="not a directory"):
        prepare(tmp_path / "nope", "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(SolutionError, match="text and image_path"):
        prepare(tmp_path / "out", "train", table=tmp_path / "bad" / "x.csv")
