"""Top-k predictions: exact brute force, cn_clip's make_topk_predictions.py as referee, npy == jsonl, manifest."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import one_error_line, snapshot
from oracles import dyadic, ranked_ids

from cn_clip_patch.device import run_upstream_main
from solution.common import SolutionError, read_jsonl
from solution.formats.feature_files import load_features, save_features
from solution.formats.hits import array_digest
from solution.predict import main
from solution.retrieval.rank import auto_chunk

pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy's, harmless here


@pytest.fixture
def feats(tmp_path):
    rng = np.random.default_rng(0)
    texts, images = dyadic(rng, (23, 16)), dyadic(rng, (57, 16))
    # Image 5, its copies 30-32 and text 7: one vector of entries +-20/16, so text 7's top four tie (broken by row).
    images[5] = rng.choice([-1.25, 1.25], 16)
    images[30:33] = images[5]
    texts[7] = images[5]
    text_ids, image_ids = rng.choice(100_000, 23, replace=False) + 1, rng.choice(100_000, 57, replace=False) + 1
    meta = {"checkpoint": "/x/best.pt", "checkpoint_sha256": "abc", "config": {"text_prompt": "p"}, "prompt": "p"}
    meta["validation"] = {"mean_recall": 42.0, "source": "test"}
    for fmt in ("npy", "jsonl"):
        save_features(tmp_path / f"text.{fmt}", "text", text_ids, texts, meta=meta)
        save_features(tmp_path / f"img.{fmt}", "image", image_ids, images, meta=meta)
    return tmp_path, text_ids, texts, image_ids, images


def _predict(d, output, *extra, fmt="npy"):
    return main(f"--image-feats {d}/img.{fmt} --text-feats {d}/text.{fmt} --output {d}/{output}".split() + list(extra))


def test_t2i_matches_brute_force_and_manifest_from_either_format(feats):
    d, tids, t, iids, im = feats
    r = _predict(d, "sub/run1.jsonl", "--chunk-size", "5", "--no-progress")
    rows = read_jsonl(d / "sub" / "run1.jsonl")
    assert [r["text_id"] for r in rows] == tids.tolist()
    assert [r["image_ids"] for r in rows] == ranked_ids(t, im, iids, 10)
    assert rows[7]["image_ids"][:4] == [int(iids[i]) for i in (5, 30, 31, 32)]  # ties: the earlier row first
    man = json.loads((d / "sub" / "run1.json").read_text())
    assert man["checkpoints"][0]["path"] == "/x/best.pt" and man["checkpoints"][0]["used_for"] == ["text", "image"]
    assert man["prompt"] == "p" and man["validation"]["mean_recall"] == 42.0 and man["ranking"] == r["ranking"]
    assert man["num_queries"] == 23 and man["gallery_size"] == 57 and man["features"]["text"]["format"] == "npy"
    _predict(d, "b.jsonl", "--valid-score", "55.5", fmt="jsonl")  # JSON lines features: the same predictions
    assert (d / "b.jsonl").read_bytes() == (d / "sub" / "run1.jsonl").read_bytes()
    assert json.loads((d / "b.json").read_text())["validation"]["mean_recall"] == 55.5


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_identical_to_upstream_make_topk_predictions(feats, direction):
    d = feats[0]
    _predict(d, f"ours_{direction}.jsonl", "--direction", direction, "--chunk-size", "7", fmt="jsonl")
    module = "cn_clip.eval.make_topk_predictions" + ("" if direction == "t2i" else "_tr")
    flags = ["--top-k", "10", "--eval-batch-size", "16", "--output", d / "up.jsonl"]
    run_upstream_main(module, ["--image-feats", d / "img.jsonl", "--text-feats", d / "text.jsonl", *flags])
    assert (d / f"ours_{direction}.jsonl").read_bytes() == (d / "up.jsonl").read_bytes()


def test_mixed_checkpoints_only_when_allowed_and_stale_temporaries_removed(feats, capsys, monkeypatch):
    d, tids, t, iids, im = feats
    save_features(d / "other.npy", "image", iids, im, meta={"checkpoint": "/y/other.pt", "checkpoint_sha256": "def"})
    argv = ["--image-feats", str(d / "other.npy"), "--text-feats", str(d / "text.npy"), "--output", str(d / "m.jsonl")]
    assert "--allow-mixed-features" in one_error_line(capsys, monkeypatch, main, argv)[1]
    killed = [d / ".m.jsonl.x1.tmp", d / ".m.json.x2.tmp", d / ".other.npy.x3.tmp"]  # a kill -9 leaves these
    for p in killed:
        p.write_text("half")
    for _ in range(2):  # the second time over its own earlier output
        main([*argv, "--allow-mixed-features"])
        assert [p.exists() for p in killed] == [False, False, True]  # only the output's own
    assert [c["path"] for c in json.loads((d / "m.json").read_text())["checkpoints"]] == ["/x/best.pt", "/y/other.pt"]


def test_auto_chunk_bounds_memory():
    assert auto_chunk(29_806, 512) * 29_806 * 4 <= 512 * 2**20
    assert auto_chunk(10**9) == 1 and auto_chunk(10) == 8192


def test_base_names_read_what_extraction_wrote(feats):
    """Extraction given ``feats/test_imgs`` writes ``feats/test_imgs.npy``; predict reads that name back."""
    d, tids, t, iids, im = feats
    save_features(d / "b" / "test_imgs", "image", iids, im, fmt="npy")
    save_features(d / "b" / "test_texts", "text", tids, t, fmt="jsonl")  # --format jsonl: JSON lines at the name
    main(f"--image-feats {d}/b/test_imgs --text-feats {d}/b/test_texts --output {d}/base.jsonl".split())
    _predict(d, "full.jsonl")
    assert (d / "base.jsonl").read_bytes() == (d / "full.jsonl").read_bytes()
    man = json.loads((d / "base.json").read_text())
    assert man["features"]["image"]["path"] == str((d / "b" / "test_imgs.npy").resolve())
    assert man["features"]["text"]["format"] == "jsonl"
    for fmt in ("npy", "jsonl"):  # both a BASE.npy and JSON lines at BASE: the meta says which was written last
        save_features(d / "b" / "test_texts", "text", tids, t, fmt=fmt)
        assert load_features(d / "b" / "test_texts", "text").format == fmt
    (d / "b" / "test_texts.meta.json").unlink()
    with pytest.raises(SolutionError, match="ambiguous"):
        load_features(d / "b" / "test_texts", "text")


BAD = {
    # name: (flags replacing the defaults, relative to the feature folder; words the one error line holds)
    "swapped npy": ("--image-feats text.npy --text-feats img.npy", "img.npy|holds image features|swapped"),
    "swapped jsonl": ("--image-feats text.jsonl --text-feats img.jsonl", "img.jsonl|holds image features|swapped"),
    "swapped cn_clip": ("--image-feats up_img.jsonl --text-feats up_img.jsonl", "up_img.jsonl:1|holds image features"),
    "other widths": ("--image-feats narrow.npy", "16-d but image features 8-d"),
    "repeated ids": ("--image-feats dup.npy", "occur more than once"),
    "top-k above the gallery": ("--top-k 58", "only 57"),
    "top-k zero": ("--top-k 0", "--top-k and --chunk-size must be at least 1"),
    "a text id that is a string": ("--text-feats broken.jsonl", "broken.jsonl:2|not an integer"),
    "no ids file": ("--image-feats noids.npy", "ids file"),
    "no such features": ("--image-feats nope", "neither|nope.npy"),
    "output named .json": ("--output x.json", "manifest"),
    "output is the text features": ("--output text.jsonl", "text.jsonl|refusing"),
    "output is the image ids": ("--image-feats img.npy --output img.ids.npy", "img.ids.npy|refusing"),
    "manifest is the features' meta": ("--output text.meta.jsonl", "text.meta.json|refusing"),
    "output is a folder": ("--output sub", "sub|is a folder"),
    "output under a file": ("--output img.npy/sub.jsonl", "img.npy/sub.jsonl|which is a file"),
    "manifest replaces an ensemble's": ("--output ens/ensemble.jsonl", "ensemble.json exists and is not"),
    "manifest replaces a user's file": ("--output notes.jsonl", "notes.json exists and is not"),
    "output replaces a checkpoint": ("--output best.pt", "best.pt exists and is not"),
    "output replaces text features": ("--output up_img.jsonl --image-feats img.npy", "up_img.jsonl exists and is not"),
    "features changed since extraction": ("--image-feats noisy.npy", "noisy.npy|changed since extraction"),
    "a device torch does not know": ("--device bogus", "--device 'bogus': not a device"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_and_outputs_one_line_nothing_written(feats, capsys, monkeypatch, case):
    d, tids, t, iids, im = feats
    (d / "sub").mkdir()
    (d / "up_img.jsonl").write_bytes((d / "img.jsonl").read_bytes())  # cn_clip's own file: no meta beside it
    save_features(d / "narrow.npy", "image", iids, im[:, :8])
    save_features(d / "dup.npy", "image", np.r_[iids[:3], iids[4], iids[4:]], im)
    save_features(d / "noids.npy", "image", iids, im)
    (d / "noids.ids.npy").unlink()
    (d / "broken.jsonl").write_text('{"text_id": 1, "feature": [0.1]}\n{"text_id": "2", "feature": [0.2]}\n')
    (d / "ens").mkdir()
    (d / "ens" / "ensemble.json").write_text('{"version": 1, "members": []}')
    (d / "notes.json").write_text('{"mine": true}')
    torch.save({"state_dict": {}}, d / "best.pt")
    save_features(d / "noisy.npy", "image", iids, im, meta={"sha256": array_digest(iids, im)})
    np.save(d / "noisy.npy", np.random.default_rng(1).normal(size=im.shape).astype(np.float32))
    flags, words = BAD[case]
    given = flags.split()
    argv = {"--image-feats": "img.jsonl", "--text-feats": "text.jsonl", "--output": "out.jsonl"}
    argv.update(zip(given[::2], given[1::2]))
    argv = {k: v if k in ("--top-k", "--device") else str(d / v) for k, v in argv.items()}
    before = snapshot(d)
    code, line = one_error_line(capsys, monkeypatch, main, [x for kv in argv.items() for x in kv])
    assert code == 2 and all(w in line for w in words.split("|")), line
    assert snapshot(d) == before  # every input byte for byte
