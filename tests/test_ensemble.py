"""Score-level ensembles (solution.ensemble, predict --ensemble): selection oracles, the CLI on tiny
checkpoints of two architectures, submissions, and one error line per bad input with nothing written.

Members are random tiny models (ViT-Tiny@RBT-Tiny and ViT-Tiny-W96@RBT-Tiny, another width,
resolution and embedding size); the selection oracles use exactly representable score matrices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from solution import ensemble, features, predict
from solution.common import SolutionError, read_jsonl, run_cli
from solution.data.make_lmdb import prepare
from solution.ensembles import members as members_mod
from solution.ensembles.selection import Choice, Plan, Problem, choose
from solution.model import ModelConfig, build_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from solution.data.synthetic import generate

    root = tmp_path_factory.mktemp("ens_demo")
    generate(root, preset="tiny", messy=False, train_queries=8, valid_queries=12, test_queries=6, images_per_query=2)
    prepare(root, ["valid", "test"], workers=1, progress=False)
    ckpts = {}
    for name, vision, seed in (("a", "ViT-Tiny", 0), ("b", "ViT-Tiny-W96", 1), ("c", "ViT-Tiny", 2)):
        config = ModelConfig(vision, "RBT-Tiny", context_length=32)
        torch.manual_seed(seed)
        ckpts[name] = save_checkpoint(root / "runs" / name / "epoch_1.pt", build_model(config).state_dict(), config)
    return root, ckpts


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SOLUTION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ens_cache"))


def _ens(data, out, *members, extra=()):
    root, ckpts = data
    return [
        "--members",
        *(str(ckpts[m]) for m in members),
        "--val-data",
        str(root / "lmdb/valid"),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--cache-dir",
        str(root / "cache"),
        *extra,
    ]


def _error(capsys, main, argv) -> str:
    assert run_cli(main, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    return err[0]


# ---------------------------------------------------------------- selection oracles (score level)


def _halves_problem():
    """Member 0 ranks gold first on queries 0-1 only, member 1 on queries 2-3 only (gold of q is item q)."""
    a = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=np.float32)
    b = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    eye = np.eye(4, dtype=np.float32)  # gallery = identity: scores are the rows themselves
    return Problem([a, b], [eye, eye], [{0}, {1}, {2}, {3}])


def test_two_members_right_on_disjoint_halves_get_both():
    problem = _halves_problem()
    rows = np.arange(4)
    for i, right in enumerate(([0, 1], [2, 3])):
        top1 = problem.ranked(Choice(tuple(np.eye(2)[i].tolist()), "zscore"), rows)[:, 0]
        assert [q for q in range(4) if top1[q] == q] == right
    records: list = []
    choice, score, _ = choose(problem, rows, Plan("zscore"), None, 0, records)
    assert choice.weights == (0.5, 0.5)
    assert problem.ranked(choice, rows)[:, 0].tolist() == [0, 1, 2, 3]
    assert score == 100.0 and problem.recall(choice, rows)["r1"] == 100.0
    assert sum(r["accepted"] for r in records) == 2  # member 0, then member 1


@pytest.mark.parametrize("seed", range(6))
def test_forward_selection_never_below_its_best_member(seed):
    rng = np.random.default_rng(seed)
    n_q, n_g = 20, 30
    queries = [rng.integers(-4, 5, size=(n_q, d)).astype(np.float32) for d in (3, 5, 4)]
    galleries = [rng.integers(-4, 5, size=(n_g, d)).astype(np.float32) for d in (3, 5, 4)]
    gold = [{int(g)} for g in rng.integers(0, n_g, size=n_q)]
    problem = Problem(queries, galleries, gold)
    rows = np.arange(n_q)
    for norm in ("zscore", "none"):
        choice, score, _ = choose(problem, rows, Plan(norm, rerankers=("dual_softmax",)), None, 0, [])
        best = max(problem.score(Choice(tuple(np.eye(3)[i].tolist()), norm), rows) for i in range(3))
        assert score >= best
        assert score == problem.score(choice, rows)


def test_dual_softmax_kept_only_when_it_strictly_helps():
    problem = _halves_problem()
    records: list = []
    choice, _, _ = choose(problem, np.arange(4), Plan("zscore", rerankers=("dual_softmax",)), None, 0, records)
    assert choice.rerank == "none"  # already 100: nothing can strictly improve
    assert any(r["stage"] == "rerank" for r in records) and not any(
        r["accepted"] for r in records if r["stage"] == "rerank"
    )


def test_flip_tta_kept_only_when_it_strictly_helps():
    """Flip TTA that scrambles the gallery is dropped; one that restores it is kept (and scored as chosen)."""
    a, b = _halves_problem().queries
    eye = np.eye(4, dtype=np.float32)
    shuffled = eye[[1, 2, 3, 0]]  # item i scores as item i+1 would: the gold moves
    rows = np.arange(4)
    for galleries, flipped, kept in (
        ([eye, eye], [shuffled, shuffled], False),
        ([shuffled, shuffled], [eye, eye], True),
    ):
        problem = Problem([a, b], galleries, [{0}, {1}, {2}, {3}], flipped=flipped)
        records: list = []
        choice, score, _ = choose(problem, rows, Plan("zscore", tta=("flip",)), None, 0, records)
        (tried,) = [r for r in records if r["stage"] == "tta"]
        plain = problem.score(dataclasses.replace(choice, tta="none"), rows)
        assert tried["accepted"] is kept and (tried["score"] > plain) is kept
        assert choice.tta == ("flip" if kept else "none") and choice.record()["tta"] == choice.tta
        assert score == problem.score(choice, rows) == max(plain, tried["score"])
    with pytest.raises(SolutionError, match="no flipped gallery"):
        Problem([a], [eye], [{0}] * 4).score(Choice((1.0,), tta="flip"), rows)


def _mirror_invariant(monkeypatch):
    """Members whose image tower sees ``(x + flip(x)) / 2``: exactly the same tensor for an image and its mirror."""
    real = members_mod.load_model

    def load(*a, **k):
        model, config, ckpt = real(*a, **k)
        inner = model.encode_image
        model.encode_image = lambda x: inner((x + torch.flip(x, dims=[-1])) * 0.5)
        return model, config, ckpt

    monkeypatch.setattr(members_mod, "load_model", load)


def test_flip_tta_of_a_mirror_invariant_model_equals_no_tta(data, tmp_path, monkeypatch):
    from solution.data.lmdb_io import LMDBSplit

    root, ckpts = data
    _mirror_invariant(monkeypatch)
    cache = tmp_path / "cache"  # its own: these features are not the plain model's
    enc = members_mod.Encoding(precision="amp", cache_dir=str(cache))
    m = members_mod.encode_member(str(ckpts["a"]), LMDBSplit(root / "lmdb/valid"), ["一件衣服"], enc, flip=True)
    assert np.array_equal(m.flipped, m.gallery) and (m.cache, m.flip_cache) == ("miss", "miss")
    np.testing.assert_allclose(m.gallery_for("flip"), m.gallery, rtol=0, atol=2e-7)
    spec = ensemble.main(
        _ens(
            data,
            tmp_path / "ens",
            "a",
            "b",
            extra=("--weights", "1", "1", "--rerank", "flip", "--cache-dir", str(cache)),
        )
    )
    (tried,) = [r for r in read_jsonl(tmp_path / "ens/ensemble_log.jsonl") if r["stage"] == "tta"]
    assert tried["score"] == spec["selection_score"] and not tried["accepted"] and spec["tta"] == "none"
    path = tmp_path / "ens/ensemble.json"
    predict.main(_predict_ens(data, path, tmp_path / "plain.jsonl", ("--cache-dir", str(cache))))
    path.write_text(json.dumps({**json.loads(path.read_text()), "tta": "flip"}))
    predict.main(_predict_ens(data, path, tmp_path / "flip.jsonl", ("--cache-dir", str(cache))))
    assert (tmp_path / "flip.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()


def test_predict_ensemble_with_flip_reuses_the_selections_features(data, tmp_path, capsys):
    """Plain and flipped galleries under distinct cache keys; the submission with flip TTA, on the validation
    queries, scores exactly what selection logged for the flip candidate."""
    from solution.data.lmdb_io import LMDBSplit
    from solution.retrieval.encode import split_queries
    from solution.retrieval.metrics import recall_at_k

    root, _ = data
    cache = tmp_path / "cache"
    spec = ensemble.main(
        _ens(
            data,
            tmp_path / "ens",
            "a",
            "b",
            extra=("--weights", "1", "3", "--rerank", "flip", "--cache-dir", str(cache)),
        )
    )
    (tried,) = [r for r in read_jsonl(tmp_path / "ens/ensemble_log.jsonl") if r["stage"] == "tta"]
    assert spec["tta"] == ("flip" if tried["accepted"] else "none")
    parts = [json.loads(p.read_text())["cache_key_parts"] for p in cache.glob("*.meta.json")]
    assert len(parts) == 4 and sorted(p.get("flip", False) for p in parts) == [False, False, True, True]
    path = tmp_path / "ens/ensemble.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tta": "flip"}))
    q = split_queries(LMDBSplit(root / "lmdb/valid"))
    texts = tmp_path / "valid_texts.jsonl"
    texts.write_text("".join(json.dumps({"text_id": t, "text": x}) + "\n" for t, x in zip(q.text_ids, q.texts)))
    predict.main(
        [
            "--ensemble",
            str(path),
            "--image-data",
            str(root / "lmdb/valid/imgs"),
            "--text-data",
            str(texts),
            "--top-k",
            "10",
            "--output",
            str(tmp_path / "sub.jsonl"),
            "--device",
            "cpu",
            "--cache-dir",
            str(cache),
            "--no-progress",
        ]
    )
    manifest = json.loads((tmp_path / "sub.json").read_text())
    assert manifest["ensemble"]["tta"] == "flip"
    assert manifest["features"]["image"]["cache"] == manifest["features"]["image"]["flip_cache"] == ["hit", "hit"]
    preds = {r["text_id"]: r["image_ids"] for r in read_jsonl(tmp_path / "sub.jsonl")}
    assert recall_at_k(preds, q.gold)["mean_recall"] == tried["score"]
    path.write_text(json.dumps({**json.loads(path.read_text()), "tta": "rotate"}))
    assert "test-time augmentation" in _error(capsys, predict.main, _predict_ens(data, path, tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()


# ---------------------------------------------------------------- the CLI on tiny checkpoints


def test_members_of_two_architectures_ensemble_while_the_soup_refuses(data, tmp_path):
    root, ckpts = data
    out = tmp_path / "ens"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "Chinese-CLIP/ensemble.sh"),
            *_ens(data, out, "a", "b", extra=("--select-split", "0.5", "--rerank", "none,dual_softmax")),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    spec = json.loads((out / "ensemble.json").read_text())
    assert [m["arch"] for m in spec["members"]] == ["ViT-Tiny@RBT-Tiny", "ViT-Tiny-W96@RBT-Tiny"]
    assert [m["embed_dim"] for m in spec["members"]] == [64, 48]
    assert sum(spec["weights"]) == pytest.approx(1.0)
    assert spec["selection_score"] >= max(m["select"]["mean_recall"] for m in spec["scores"]["members"])
    assert spec["selection_score"] == spec["scores"]["select"]["mean_recall"]
    n_sel, n_rep = spec["scores"]["select"]["queries_scored"], spec["scores"]["report"]["queries_scored"]
    assert n_sel + n_rep == spec["scores"]["all"]["queries_scored"] == 12
    from solution.formats.hits import read_hits
    from solution.retrieval.metrics import mean_recall

    for name, scores in [
        ("ensemble", spec["scores"]),
        *((f"member{i}", s) for i, s in enumerate(spec["scores"]["members"])),
    ]:
        hits = read_hits(out / spec["hits"][name])
        assert len(hits[0]) == 12 and mean_recall(hits[1]) == scores["all"]["mean_recall"]
    log = read_jsonl(out / "ensemble_log.jsonl")
    assert {r["stage"] for r in log} == {"weights", "rerank"} and (out / "selection.png").stat().st_size > 0
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "Chinese-CLIP/model_soup.sh"),
            "--checkpoints",
            str(ckpts["a"]),
            str(ckpts["b"]),
            "--method",
            "uniform",
            "--no-score",
            "--output",
            str(tmp_path / "soup"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "ViT-Tiny-W96" in errors[0], proc.stderr
    assert not (tmp_path / "soup").exists()


def test_folds_cross_fit_then_refit_on_all(data, tmp_path):
    spec = ensemble.main(_ens(data, tmp_path / "ens", "a", "b", "c", extra=("--folds", "3", "--norm", "softmax")))
    cf = spec["crossfit"]
    assert len(cf["fold_scores"]) == 3 and cf["mean"] == pytest.approx(np.mean(cf["fold_scores"]))
    assert cf["low"] <= cf["mean"] <= cf["high"]
    folds = {r.get("fold") for r in read_jsonl(tmp_path / "ens" / "ensemble_log.jsonl")}
    assert folds == {0, 1, 2, "refit"}
    assert spec["norm"] == "softmax" and spec["norm_temperature"] > 0


def _features(data, member, out):
    root, ckpts = data
    features.main(
        [
            "--extract-image-feats",
            "--extract-text-feats",
            "--image-data",
            str(root / "lmdb/test/imgs"),
            "--text-data",
            str(root / "test_texts.jsonl"),
            "--resume",
            str(ckpts[member]),
            "--device",
            "cpu",
            "--image-feat-output-path",
            str(out / "img.npy"),
            "--text-feat-output-path",
            str(out / "txt.npy"),
            "--cache-dir",
            str(root / "cache"),
            "--no-progress",
        ]
    )


def _predict_ens(data, spec_path, output, extra=()):
    root, _ = data
    return [
        "--ensemble",
        str(spec_path),
        "--image-data",
        str(root / "lmdb/test/imgs"),
        "--text-data",
        str(root / "test_texts.jsonl"),
        "--top-k",
        "5",
        "--output",
        str(output),
        "--device",
        "cpu",
        "--cache-dir",
        str(root / "cache"),
        "--no-progress",
        *extra,
    ]


def test_predict_ensemble_of_one_member_equals_plain_predict(data, tmp_path):
    ensemble.main(_ens(data, tmp_path / "ens", "b", extra=("--weights", "1")))
    _features(data, "b", tmp_path)
    predict.main(
        [
            "--image-feats",
            str(tmp_path / "img.npy"),
            "--text-feats",
            str(tmp_path / "txt.npy"),
            "--top-k",
            "5",
            "--output",
            str(tmp_path / "plain.jsonl"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    predict.main(_predict_ens(data, tmp_path / "ens/ensemble.json", tmp_path / "ens.jsonl"))
    assert (tmp_path / "ens.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()
    manifest = json.loads((tmp_path / "ens.json").read_text())
    assert manifest["ensemble"]["weights"] == [1.0] and manifest["ensemble"]["rerank"]["method"] == "none"
    assert [c["path"] for c in manifest["checkpoints"]] == [str(data[1]["b"].resolve())]


def test_predict_ensemble_fuses_as_the_float64_oracle(data, tmp_path):
    from solution.ensembles.fusion import fuse
    from solution.formats.feature_files import load_features

    ensemble.main(_ens(data, tmp_path / "ens", "a", "b", extra=("--weights", "1", "3")))
    predict.main(_predict_ens(data, tmp_path / "ens/ensemble.json", tmp_path / "ens.jsonl"))
    mats = []
    for m in ("a", "b"):
        _features(data, m, tmp_path / m)
        t, i = load_features(tmp_path / m / "txt.npy", "text"), load_features(tmp_path / m / "img.npy", "image")
        mats.append(t.feats.astype(np.float64) @ i.feats.astype(np.float64).T)
    fused = fuse(mats, [0.25, 0.75], "zscore")
    rows = read_jsonl(tmp_path / "ens.jsonl")
    for q, row in enumerate(rows):
        got = fused[q][np.searchsorted(i.ids, row["image_ids"])]
        assert np.all(np.diff(got) <= 1e-6)  # best first
        assert got[-1] >= np.sort(fused[q])[::-1][4] - 1e-6  # nothing outside the top-5 scores more
    manifest = json.loads((tmp_path / "ens.json").read_text())
    assert manifest["ensemble"]["weights"] == [0.25, 0.75] and len(manifest["checkpoints"]) == 2


# ---------------------------------------------------------------- bad input: one line, nothing written


def test_bad_weights_and_empty_selection_half(data, tmp_path, capsys):
    out = tmp_path / "ens"
    assert "must be >= 0" in _error(capsys, ensemble.main, _ens(data, out, "a", "b", extra=("--weights", "-1", "2")))
    assert "positive sum" in _error(capsys, ensemble.main, _ens(data, out, "a", "b", extra=("--weights", "0", "0")))
    assert "empty selection half" in _error(
        capsys, ensemble.main, _ens(data, out, "a", "b", extra=("--select-split", "0.01"))
    )
    assert not out.exists()


def test_member_that_cannot_encode_the_split(data, tmp_path, capsys):
    root, ckpts = data
    bad = tmp_path / "bad.pt"
    config = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=8, text_prompt="这是一张很长很长很长的图片")
    save_checkpoint(bad, torch.load(ckpts["a"], weights_only=True)["state_dict"], config)
    argv = _ens(data, tmp_path / "ens", "a")
    argv[argv.index("--members") + 1 : argv.index("--members") + 1] = [str(bad)]
    line = _error(capsys, ensemble.main, argv)
    assert "bad.pt cannot encode" in line
    assert not (tmp_path / "ens").exists()


def test_members_with_different_galleries(data, tmp_path, capsys, monkeypatch):
    real, calls = members_mod.cached_image_features, []

    def dropping(*a, **k):
        ids, feats, info = real(*a, **k)
        calls.append(1)
        return (ids[:-1], feats[:-1], info) if len(calls) == 2 else (ids, feats, info)

    monkeypatch.setattr(members_mod, "cached_image_features", dropping)
    line = _error(capsys, ensemble.main, _ens(data, tmp_path / "ens", "a", "c"))
    assert "different galleries" in line
    assert not (tmp_path / "ens").exists()


def test_member_changed_since_selection(data, tmp_path, capsys):
    root, ckpts = data
    member = tmp_path / "m.pt"
    member.write_bytes(ckpts["a"].read_bytes())
    argv = _ens(data, tmp_path / "ens", "a")
    argv[argv.index("--members") + 1] = str(member)
    ensemble.main(argv)
    config = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32)
    torch.manual_seed(9)
    save_checkpoint(member, build_model(config).state_dict(), config)
    line = _error(capsys, predict.main, _predict_ens(data, tmp_path / "ens/ensemble.json", tmp_path / "sub.jsonl"))
    assert "changed since selection" in line
    assert not (tmp_path / "sub.jsonl").exists() and not (tmp_path / "sub.json").exists()


def test_qb_norm_with_a_bank_of_training_texts(data, tmp_path):
    """The submission's QB-Norm equals the float64 inverted softmax of the fused scores over the fused bank."""
    from solution.ensembles.fusion import fuse, inverted_softmax
    from solution.formats.feature_files import load_features
    from solution.formats.muge import read_texts

    root, ckpts = data
    bank_file = root / "train_texts.jsonl"
    ensemble.main(
        _ens(
            data,
            tmp_path / "ens",
            "a",
            "c",
            extra=("--weights", "1", "1", "--rerank", "qb_norm", "--bank", str(bank_file)),
        )
    )
    path = tmp_path / "ens/ensemble.json"
    spec = json.loads(path.read_text())
    assert spec["rerank"]["bank"] == str(bank_file.resolve())
    spec["rerank"].update(method="qb_norm", temperature=0.05)  # forced on: the oracle is about the arithmetic
    path.write_text(json.dumps(spec))
    predict.main(_predict_ens(data, path, tmp_path / "ens.jsonl"))
    bank = tmp_path / "bank.jsonl"
    bank.write_text("".join(json.dumps({"text_id": r.text_id, "text": r.text}) + "\n" for r in read_texts(bank_file)))
    mats, banks = [], []
    for m in ("a", "c"):
        _features(data, m, tmp_path / m)
        features.main(
            [
                "--extract-text-feats",
                "--text-data",
                str(bank),
                "--resume",
                str(ckpts[m]),
                "--device",
                "cpu",
                "--text-feat-output-path",
                str(tmp_path / m / "bank.npy"),
                "--no-progress",
            ]
        )
        i = load_features(tmp_path / m / "img.npy", "image")
        g = i.feats.astype(np.float64).T
        mats.append(load_features(tmp_path / m / "txt.npy", "text").feats.astype(np.float64) @ g)
        banks.append(load_features(tmp_path / m / "bank.npy", "text").feats.astype(np.float64) @ g)
    expected = inverted_softmax(fuse(mats, None, "zscore"), fuse(banks, None, "zscore"), 0.05)
    for q, row in enumerate(read_jsonl(tmp_path / "ens.jsonl")):
        got = expected[q][np.searchsorted(i.ids, row["image_ids"])]
        assert np.all(np.diff(got) <= 1e-4) and got[-1] >= np.sort(expected[q])[::-1][4] - 1e-4
    assert json.loads((tmp_path / "ens.json").read_text())["ensemble"]["rerank"]["method"] == "qb_norm"
