"""Top-k predictions: brute force, cn_clip's make_topk_predictions.py as referee, npy == jsonl, manifest."""

import json

import numpy as np
import pytest
from cli_helpers import one_error_line

from cn_clip_patch.device import run_upstream_main
from solution.common import SolutionError, read_jsonl
from solution.formats.feature_files import load_features, save_features
from solution.predict import main
from solution.retrieval.rank import auto_chunk, rank

# runpy warns when another test file already imported the module it runs as __main__: harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")


def _dyadic(rng, n, d, top=20, denom=16):
    """Features k/denom with |k| <= top: every product and partial sum is exact in float32 (while
    d * top**2 < 2**24), so any BLAS kernel, chunking or accumulation order gives the same scores
    and ties are ties everywhere; with top <= 256, bf16 holds every value too."""
    return (rng.integers(-top, top + 1, (n, d)) / denom).astype(np.float32)


@pytest.fixture
def feats(tmp_path):
    rng = np.random.default_rng(0)
    texts, images = _dyadic(rng, 23, 16), _dyadic(rng, 57, 16)
    # image 5, its exact duplicates 30-32 and text 7 are one vector of entries +-20/16: no other image can
    # score as high for text 7 (|x.y| <= sum |x_i| |y_i|), so its top four are a 4-way tie, broken by row.
    images[5] = rng.choice([-1.25, 1.25], 16)
    images[30:33] = images[5]
    texts[7] = images[5]
    text_ids = rng.choice(100_000, 23, replace=False) + 1
    image_ids = rng.choice(100_000, 57, replace=False) + 1
    meta = {
        "checkpoint": "/x/best.pt",
        "checkpoint_sha256": "abc",
        "config": {"text_prompt": "p"},
        "prompt": "p",
        "validation": {"mean_recall": 42.0, "source": "test"},
    }
    for fmt in ("npy", "jsonl"):
        save_features(tmp_path / f"text.{fmt}", "text", text_ids, texts, meta=meta)
        save_features(tmp_path / f"img.{fmt}", "image", image_ids, images, meta=meta)
    return tmp_path, text_ids, texts, image_ids, images


def _brute(q, g, gids, k):
    """The exact ranking: float64 scores (exact on these features), score descending, then row ascending."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    return [gids[np.lexsort((np.arange(len(row)), -row))[:k]].tolist() for row in s]


def test_t2i_matches_brute_force_and_manifest(feats):
    d, tids, t, iids, im = feats
    out = d / "sub" / "run1.jsonl"
    main(
        [
            "--image-feats",
            str(d / "img.npy"),
            "--text-feats",
            str(d / "text.npy"),
            "--output",
            str(out),
            "--chunk-size",
            "5",
            "--no-progress",
        ]
    )
    rows = read_jsonl(out)
    assert [r["text_id"] for r in rows] == tids.tolist()
    assert [r["image_ids"] for r in rows] == _brute(t, im, iids, 10)
    assert rows[7]["image_ids"][:4] == [int(iids[i]) for i in (5, 30, 31, 32)]  # ties: earlier row first
    assert all(len(set(r["image_ids"])) == 10 for r in rows)
    man = json.loads((d / "sub" / "run1.json").read_text())
    assert man["checkpoints"][0]["path"] == "/x/best.pt" and man["checkpoints"][0]["used_for"] == ["text", "image"]
    assert man["prompt"] == "p" and man["validation"]["mean_recall"] == 42.0
    assert man["num_queries"] == 23 and man["gallery_size"] == 57 and man["features"]["text"]["format"] == "npy"


def test_npy_and_jsonl_features_give_identical_predictions(feats):
    d = feats[0]
    main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "a.jsonl")])
    main(
        [
            "--image-feats",
            str(d / "img.jsonl"),
            "--text-feats",
            str(d / "text.jsonl"),
            "--output",
            str(d / "b.jsonl"),
            "--valid-score",
            "55.5",
        ]
    )
    assert (d / "a.jsonl").read_bytes() == (d / "b.jsonl").read_bytes()
    assert json.loads((d / "b.json").read_text())["validation"]["mean_recall"] == 55.5


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_identical_to_upstream_make_topk_predictions(feats, direction):
    d = feats[0]
    ours = d / f"ours_{direction}.jsonl"
    main(
        [
            "--image-feats",
            str(d / "img.jsonl"),
            "--text-feats",
            str(d / "text.jsonl"),
            "--output",
            str(ours),
            "--direction",
            direction,
            "--top-k",
            "10",
        ]
    )
    module = "cn_clip.eval.make_topk_predictions" + ("" if direction == "t2i" else "_tr")
    run_upstream_main(
        module,
        [
            "--image-feats",
            d / "img.jsonl",
            "--text-feats",
            d / "text.jsonl",
            "--top-k",
            "10",
            "--eval-batch-size",
            "16",
            "--output",
            d / "up.jsonl",
        ],
    )
    assert read_jsonl(ours) == read_jsonl(d / "up.jsonl")
    assert ours.read_bytes() == (d / "up.jsonl").read_bytes()


def test_i2t_schema_and_chunk_independence(feats):
    d, tids, t, iids, im = feats
    outs = []
    for chunk in ("1", "7", "1000"):
        out = d / f"i2t_{chunk}.jsonl"
        main(
            [
                "--image-feats",
                str(d / "img.npy"),
                "--text-feats",
                str(d / "text.npy"),
                "--output",
                str(out),
                "--direction",
                "i2t",
                "--top-k",
                "5",
                "--chunk-size",
                chunk,
            ]
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    rows = read_jsonl(d / "i2t_1.jsonl")
    assert set(rows[0]) == {"image_id", "text_ids"} and len(rows) == 57
    assert [r["text_ids"] for r in rows] == _brute(im, t, tids, 5)


def test_manifest_warns_on_mixed_checkpoints(feats, caplog):
    d, tids, t, iids, im = feats
    save_features(d / "other.npy", "image", iids, im, meta={"checkpoint": "/y/other.pt", "checkpoint_sha256": "def"})
    main(["--image-feats", str(d / "other.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "m.jsonl")])
    assert "different checkpoints" in caplog.text
    man = json.loads((d / "m.json").read_text())
    assert [c["path"] for c in man["checkpoints"]] == ["/x/best.pt", "/y/other.pt"]


def test_bad_inputs(feats):
    d, tids, t, iids, im = feats
    save_features(d / "dim.npy", "image", iids, im[:, :8])
    with pytest.raises(SolutionError, match="16-d but image features 8-d"):
        main(["--image-feats", str(d / "dim.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "x.jsonl")])
    dup = iids.copy()
    dup[3] = dup[4]
    save_features(d / "dup.npy", "image", dup, im)
    with pytest.raises(SolutionError, match=f"e.g. {dup[4]}"):
        main(["--image-feats", str(d / "dup.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "x.jsonl")])
    with pytest.raises(SolutionError, match="only 57"):
        main(
            [
                "--image-feats",
                str(d / "img.npy"),
                "--text-feats",
                str(d / "text.npy"),
                "--output",
                str(d / "x.jsonl"),
                "--top-k",
                "58",
            ]
        )
    with pytest.raises(SolutionError, match="manifest"):
        main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "x.json")])
    (d / "broken.jsonl").write_text('{"text_id": 1, "feature": [0.1]}\n{"text_id": "2", "feature": [0.2]}\n')
    with pytest.raises(SolutionError, match="broken.jsonl:2"):
        main(
            [
                "--image-feats",
                str(d / "img.npy"),
                "--text-feats",
                str(d / "broken.jsonl"),
                "--output",
                str(d / "x.jsonl"),
            ]
        )
    (d / "img.ids.npy").unlink()
    with pytest.raises(SolutionError, match="ids file"):
        main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "x.jsonl")])
    assert not (d / "x.jsonl").exists()


def test_auto_chunk_bounds_memory():
    assert auto_chunk(29_806, 512) * 29_806 * 4 <= 512 * 2**20
    assert auto_chunk(10**9) == 1 and auto_chunk(10) == 8192


@pytest.mark.parametrize("q_top,g_top", [(400, 400), (64, 4000)])
def test_bf16_prefilter_is_exact(q_top, g_top):
    # Integer features beyond bf16's 8-bit significand (so the prefilter really rounds) whose float32
    # products are exact (64 * q_top * g_top < 2**24): the oracle is exact on any CPU.
    rng = np.random.default_rng(5)
    q, g = _dyadic(rng, 300, 64, q_top, 1), _dyadic(rng, 2000, 64, g_top, 1)
    signs = rng.choice([-1.0, 1.0], 64).astype(np.float32)
    g[7] = signs * g_top  # the best possible row for the queries below, with 40 exact copies:
    g[100:140] = g[7]  # 41 tied rows, more than the candidates: the certificate must fail there
    q[:5] = signs * q_top
    gids = np.arange(2000) * 3 + 11
    ref, ref_s = rank(q, g, gids, 10, method="fp32")
    stats = {}
    got, got_s = rank(q, g, gids, 10, method="prefilter", chunk_size=64, stats=stats)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got_s, ref_s)
    assert stats["method"] == "prefilter" and stats["prefilter_candidates"] == 32
    assert 5 <= stats["fp32_redone"] < 300  # the tied queries, and not every query
    assert got[0].tolist() == [int(gids[i]) for i in [7, *range(100, 109)]]
    assert got.tolist() == _brute(q, g, gids, 10)


def test_prefilter_in_cli_matches_fp32(feats):
    d = feats[0]
    for method in ("prefilter", "fp32"):
        r = main(
            [
                "--image-feats",
                str(d / "img.npy"),
                "--text-feats",
                str(d / "text.npy"),
                "--output",
                str(d / f"{method}.jsonl"),
                "--method",
                method,
            ]
        )
        assert r["ranking"]["method"] == method
    assert (d / "prefilter.jsonl").read_bytes() == (d / "fp32.jsonl").read_bytes()
    assert json.loads((d / "prefilter.json").read_text())["ranking"]["method"] == "prefilter"


def test_base_names_read_what_extraction_wrote(feats):
    """README: extraction given ``feats/test_imgs`` writes ``feats/test_imgs.npy``; predict reads that name back."""
    d, tids, t, iids, im = feats
    save_features(d / "b" / "test_imgs", "image", iids, im, fmt="npy")  # --image-feat-output-path feats/test_imgs
    save_features(d / "b" / "test_texts", "text", tids, t, fmt="jsonl")  # --format jsonl: JSON lines at the name
    assert (d / "b" / "test_imgs.npy").is_file() and (d / "b" / "test_texts").is_file()
    main(
        [
            "--image-feats",
            str(d / "b" / "test_imgs"),
            "--text-feats",
            str(d / "b" / "test_texts"),
            "--output",
            str(d / "base.jsonl"),
        ]
    )
    main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "full.jsonl")])
    assert (d / "base.jsonl").read_bytes() == (d / "full.jsonl").read_bytes()
    man = json.loads((d / "base.json").read_text())
    assert man["features"]["image"]["path"] == str((d / "b" / "test_imgs.npy").resolve())
    assert man["features"]["text"]["format"] == "jsonl"
    # Both a BASE.npy and JSON lines at BASE: the meta beside them says which was written last.
    save_features(d / "b" / "test_texts", "text", tids, t, fmt="npy")
    assert load_features(d / "b" / "test_texts", "text").format == "npy"
    save_features(d / "b" / "test_texts", "text", tids, t, fmt="jsonl")
    assert load_features(d / "b" / "test_texts", "text").format == "jsonl"
    (d / "b" / "test_texts.meta.json").unlink()
    with pytest.raises(SolutionError, match="ambiguous"):
        load_features(d / "b" / "test_texts", "text")
    with pytest.raises(SolutionError, match=r"neither .*nope\.npy nor .*nope exists"):
        load_features(d / "b" / "nope", "image")


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


BAD = {
    # name: (flags, words the one error line must contain); paths are relative to the feature folder
    "swapped npy": (
        ["--image-feats", "text.npy", "--text-feats", "img.npy"],
        ["img.npy", "holds image features", "swapped"],
    ),
    "swapped jsonl": (
        ["--image-feats", "text.jsonl", "--text-feats", "img.jsonl"],
        ["img.jsonl", "holds image features", "swapped"],
    ),
    "swapped cn_clip jsonl without meta": (
        ["--image-feats", "up_img.jsonl", "--text-feats", "up_img.jsonl"],
        ["up_img.jsonl:1", "holds image features", "swapped"],
    ),
    "output is the text features": (["--output", "text.jsonl"], ["text.jsonl", "one of the inputs"]),
    "output is the image ids": (
        ["--image-feats", "img.npy", "--output", "img.ids.npy"],
        ["img.ids.npy", "one of the inputs"],
    ),
    "manifest is the features' meta": (["--output", "text.meta.jsonl"], ["text.meta.json", "one of the inputs"]),
    "output is a folder": (["--output", "sub"], ["sub", "is a folder"]),
    "output under a file": (["--output", "img.npy/sub.jsonl"], ["img.npy/sub.jsonl", "which is a file"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_and_outputs_one_line_nothing_written(feats, capsys, monkeypatch, case):
    d = feats[0]
    (d / "sub").mkdir()
    (d / "up_img.jsonl").write_bytes((d / "img.jsonl").read_bytes())  # cn_clip's own file: no meta beside it
    flags, words = BAD[case]
    given = dict(zip(flags[::2], flags[1::2]))
    argv = {"--image-feats": "img.jsonl", "--text-feats": "text.jsonl", "--output": "out.jsonl", **given}
    before = _files(d)
    code, line = one_error_line(capsys, monkeypatch, main, [x for k, v in argv.items() for x in (k, str(d / v))])
    assert code == 2
    for w in words:
        assert w in line, (w, line)
    assert _files(d) == before  # no submission or manifest written, every input byte for byte
