import base64
import hashlib
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from solution.common import SolutionError, read_jsonl
from solution.data.images import sniff_format
from solution.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    COUNTS,
    REGIONS,
    SHAPES,
    draw_image,
    generate,
    random_scene,
)
from solution.demo_data import main

FILES = [f"{s}_{k}" for s in ("train", "valid", "test") for k in ("imgs.tsv", "texts.jsonl")] + ["test_answers.jsonl"]
FILES += [f"general/{s}_{k}" for s in ("train", "valid") for k in ("imgs.tsv", "texts.jsonl")]


def _tsv(path):
    rows = {}
    for line in open(path, encoding="utf-8"):
        image_id, b64 = line.rstrip("\n").split("\t")
        rows[int(image_id)] = base64.urlsafe_b64decode(b64)
    return rows


def _digest(d):
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILES}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    return d, generate(d, preset="tiny")


def test_layout(tiny):
    d, info = tiny
    for f in FILES:
        assert (d / f).is_file(), f
    assert json.loads((d / "demo_info.json").read_text(encoding="utf-8"))["splits"] == info["splits"]
    n_images = sum(v["images"] for v in info["splits"].values())
    assert 24 <= n_images <= 100  # "a few dozen"
    rows = read_jsonl(d / "general" / "valid_texts.jsonl")  # the general set's gold covers every described image
    assert set().union(*(r["image_ids"] for r in rows)) >= set(_tsv(d / "general" / "valid_imgs.tsv"))


def test_deterministic_and_seeded(tiny, tmp_path):
    d, _ = tiny
    generate(tmp_path / "again", preset="tiny")
    assert _digest(tmp_path / "again") == _digest(d)
    generate(tmp_path / "other", preset="tiny", seed=1)
    assert _digest(tmp_path / "other")["train_imgs.tsv"] != _digest(d)["train_imgs.tsv"]


def test_queries_composed_disjoint_ids_unique_and_gold_consistent(tiny):
    d, _ = tiny
    texts = {s: read_jsonl(d / f"{s}_texts.jsonl") for s in ("train", "valid", "test")}
    answers = read_jsonl(d / "test_answers.jsonl")
    assert all("image_ids" not in t for t in texts["test"])
    assert [a["text_id"] for a in answers] == [t["text_id"] for t in texts["test"]]
    assert all(isinstance(a["image_ids"], list) and a["image_ids"] for a in answers)
    for text in (t["text"] for t in texts["train"]):  # composed Chinese queries
        assert "背景上有" in text and any(bg in text for bg in BACKGROUNDS) and any(c in text for c in COLORS)
        assert any(s in text for s in SHAPES) and any(n in text for n in COUNTS.values())
    queries = {s: {t["text"] for t in ts} for s, ts in texts.items()}
    assert not queries["train"] & queries["valid"] and not queries["train"] & queries["test"]
    assert not queries["valid"] & queries["test"]
    # several images per query, every gold id in its split's TSV
    gold = {"train": texts["train"], "valid": texts["valid"], "test": answers}
    image_ids, text_ids = [], []
    for split, rows in gold.items():
        imgs = _tsv(d / f"{split}_imgs.tsv")
        image_ids += list(imgs)
        for t in rows:
            text_ids.append(t["text_id"])
            assert len(t["image_ids"]) >= 2
            assert set(t["image_ids"]) <= set(imgs)
    for split in ("train", "valid"):
        image_ids += list(_tsv(d / "general" / f"{split}_imgs.tsv"))
        text_ids += [t["text_id"] for t in read_jsonl(d / "general" / f"{split}_texts.jsonl")]
    assert len(image_ids) == len(set(image_ids)) and len(text_ids) == len(set(text_ids))
    assert all(isinstance(i, int) for i in image_ids + text_ids)


def test_mess_is_present_and_typed(tiny):
    d, info = tiny
    train = _tsv(d / "train_imgs.tsv")
    kinds = {m["kind"]: m["image_id"] for m in info["messy"]["train"]}
    assert sniff_format(train[kinds["gif_animated"]]) == "GIF"
    assert Image.open(io.BytesIO(train[kinds["gif_animated"]])).n_frames == 2
    assert sniff_format(train[kinds["png_rgba"]]) == "PNG"
    assert sniff_format(train[kinds["truncated"]]) == "JPEG"
    with pytest.raises(OSError):
        Image.open(io.BytesIO(train[kinds["truncated"]])).load()
    assert info["bad_image_ids"] == sorted(
        m["image_id"] for ms in info["messy"].values() for m in ms if m["kind"] in ("truncated", "html")
    )
    # every other image is a decodable 64 px RGB JPEG
    ok = [i for i in train if i not in kinds.values()]
    im = Image.open(io.BytesIO(train[ok[0]]))
    assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "RGB"


def test_cli_sizes_and_errors(tmp_path, capsys):
    out = tmp_path / "x"
    info = main(f"--out {out} --preset tiny --train-queries 4 --images-per-query 3 --image-size 32 --no-mess".split())
    assert info["splits"]["train"] == {"queries": 4, "images": 12}
    assert info["messy"] == {}
    im = Image.open(io.BytesIO(next(iter(_tsv(out / "train_imgs.tsv").values()))))
    assert im.size == (32, 32)
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["images"] == 12
    with pytest.raises(SolutionError):
        generate(tmp_path / "y", preset="tiny", valid_queries=0)
    with pytest.raises(SolutionError):
        generate(tmp_path / "y", preset="nope")


@pytest.fixture(scope="module")
def fine(tmp_path_factory):
    d = tmp_path_factory.mktemp("fine")
    generate(
        d,
        preset="default",
        train_queries=30,
        valid_queries=20,
        test_queries=20,
        images_per_query=2,
        general_train_images=30,
        general_valid_images=10,
    )
    return d


def test_fine_queries_name_size_and_place_and_stay_disjoint(fine):
    texts = {s: [t["text"] for t in read_jsonl(fine / f"{s}_texts.jsonl")] for s in ("train", "valid", "test")}
    assert [len(v) for v in texts.values()] == [30, 20, 20]
    sets = [set(v) for v in texts.values()]
    assert all(len(s) == len(v) for s, v in zip(sets, texts.values()))  # distinct within a split
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])  # disjoint across splits
    for text in sum(texts.values(), []):
        assert text.split("背景")[0] in BACKGROUNDS
        assert any(w in text for w in REGIONS) and any(f"的{z}{sh}" in text for z in "大小" for sh in SHAPES)
        assert any(c in text for c in COLORS) and any(n in text for n in COUNTS.values())
        if "，" in text:  # two groups: opposite halves
            assert ("左边是" in text and "右边是" in text) or ("上方是" in text and "下方是" in text)


def test_a_group_is_drawn_in_the_half_its_query_names():
    # oracle: the other half of a one-group image is exactly the background colour (no shape pixel
    # reaches past the middle, anti-aliasing included), and it is not for the group's own half
    rng = random.Random(0)
    scenes = [s for s in (random_scene(rng, 0.0, fine=True) for _ in range(40))]
    for i, scene in enumerate(scenes):
        im = np.asarray(draw_image(scene, random.Random(i), 64)).astype(int)
        where = scene.groups[0].where
        other = {"左边": im[:, 36:], "右边": im[:, :28], "上方": im[36:, :], "下方": im[:28, :]}[where]
        own = {"左边": im[:, :32], "右边": im[:, 32:], "上方": im[:32, :], "下方": im[32:, :]}[where]
        flat = other.reshape(-1, 3)
        assert (flat == flat[0]).all(), (scene.query(), where)
        assert not (own.reshape(-1, 3) == flat[0]).all(), scene.query()
