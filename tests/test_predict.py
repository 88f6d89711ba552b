"""Top-k predictions: brute force, cn_clip's make_topk_predictions.py as referee, npy == jsonl, manifest."""
import json

import numpy as np
import pytest

from cn_clip_patch.device import run_upstream_main
from solution.common import SolutionError, read_jsonl
from solution.feature_files import save_features
from solution.predict import auto_chunk, main, rank


# runpy warns when another test file already imported the module it runs as __main__: harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def feats(tmp_path):
    rng = np.random.default_rng(0)
    texts, images = _unit(rng, 23, 16), _unit(rng, 57, 16)
    images[30:33] = images[5]  # exact duplicates: ties resolved toward the earlier row
    texts[7] = images[5]
    text_ids = rng.choice(100_000, 23, replace=False) + 1
    image_ids = rng.choice(100_000, 57, replace=False) + 1
    meta = {"checkpoint": "/x/best.pt", "checkpoint_sha256": "abc", "config": {"text_prompt": "p"}, "prompt": "p",
            "validation": {"mean_recall": 42.0, "source": "test"}}
    for fmt in ("npy", "jsonl"):
        save_features(tmp_path / f"text.{fmt}", "text", text_ids, texts, meta=meta)
        save_features(tmp_path / f"img.{fmt}", "image", image_ids, images, meta=meta)
    return tmp_path, text_ids, texts, image_ids, images


def _brute(q, g, gids, k):
    s = q @ g.T
    return [gids[np.argsort(-row, kind="stable")[:k]].tolist() for row in s]


def test_t2i_matches_brute_force_and_manifest(feats):
    d, tids, t, iids, im = feats
    out = d / "sub" / "run1.jsonl"
    main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "text.npy"), "--output", str(out),
          "--chunk-size", "5", "--no-progress"])
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
    main(["--image-feats", str(d / "img.jsonl"), "--text-feats", str(d / "text.jsonl"), "--output", str(d / "b.jsonl"),
          "--valid-score", "55.5"])
    assert (d / "a.jsonl").read_bytes() == (d / "b.jsonl").read_bytes()
    assert json.loads((d / "b.json").read_text())["validation"]["mean_recall"] == 55.5


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_identical_to_upstream_make_topk_predictions(feats, direction):
    d = feats[0]
    ours = d / f"ours_{direction}.jsonl"
    main(["--image-feats", str(d / "img.jsonl"), "--text-feats", str(d / "text.jsonl"), "--output", str(ours),
          "--direction", direction, "--top-k", "10"])
    module = "cn_clip.eval.make_topk_predictions" + ("" if direction == "t2i" else "_tr")
    run_upstream_main(module, ["--image-feats", d / "img.jsonl", "--text-feats", d / "text.jsonl", "--top-k", "10",
                               "--eval-batch-size", "16", "--output", d / "up.jsonl"])
    assert read_jsonl(ours) == read_jsonl(d / "up.jsonl")
    assert ours.read_bytes() == (d / "up.jsonl").read_bytes()


def test_i2t_schema_and_chunk_independence(feats):
    d, tids, t, iids, im = feats
    outs = []
    for chunk in ("1", "7", "1000"):
        out = d / f"i2t_{chunk}.jsonl"
        main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "text.npy"), "--output", str(out),
              "--direction", "i2t", "--top-k", "5", "--chunk-size", chunk])
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
        main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "x.jsonl"),
              "--top-k", "58"])
    with pytest.raises(SolutionError, match="manifest"):
        main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "x.json")])
    (d / "broken.jsonl").write_text('{"text_id": 1, "feature": [0.1]}\n{"text_id": "2", "feature": [0.2]}\n')
    with pytest.raises(SolutionError, match="broken.jsonl:2"):
        main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "broken.jsonl"), "--output", str(d / "x.jsonl")])
    (d / "img.ids.npy").unlink()
    with pytest.raises(SolutionError, match="ids file"):
        main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "x.jsonl")])
    assert not (d / "x.jsonl").exists()


def test_auto_chunk_bounds_memory():
    assert auto_chunk(29_806, 512) * 29_806 * 4 <= 512 * 2**20
    assert auto_chunk(10**9) == 1 and auto_chunk(10) == 8192


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_bf16_prefilter_is_exact(scale):
    rng = np.random.default_rng(5)
    q, g = _unit(rng, 300, 64) * scale, _unit(rng, 2000, 64) * np.float32(scale)
    g[100:140] = g[7]  # 41 identical rows: more tied rows than candidates, the certificate must fail there
    q[:5] = g[7]
    gids = np.arange(2000) * 3 + 11
    ref, ref_s = rank(q, g, gids, 10, method="fp32")
    stats = {}
    got, got_s = rank(q, g, gids, 10, method="prefilter", chunk_size=64, stats=stats)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-6, atol=1e-6)
    assert stats["method"] == "prefilter" and stats["prefilter_candidates"] == 32
    assert 5 <= stats["fp32_redone"] < 300  # the tied queries, and not every query
    assert got[0].tolist() == [int(gids[i]) for i in [7, *range(100, 109)]]
    assert [r for r in got.tolist()] == _brute(q, g, gids, 10)


def test_prefilter_in_cli_matches_fp32(feats):
    d = feats[0]
    for method in ("prefilter", "fp32"):
        r = main(["--image-feats", str(d / "img.npy"), "--text-feats", str(d / "text.npy"), "--output",
                  str(d / f"{method}.jsonl"), "--method", method])
        assert r["ranking"]["method"] == method
    assert (d / "prefilter.jsonl").read_bytes() == (d / "fp32.jsonl").read_bytes()
    assert json.loads((d / "prefilter.json").read_text())["ranking"]["method"] == "prefilter"
