"""Score-level ensembles (solution.ensemble, predict --ensemble): selection, the CLI, float64 fusion, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from cli_helpers import one_error_line
from oracles import fused, qb_norm, stable_topk

from solution import ensemble, features, predict
from solution.common import SolutionError, folder_lock, read_jsonl
from solution.data.lmdb_io import LMDBSplit
from solution.ensembles import make_ensemble
from solution.ensembles.fusion import Choice, Plan, Problem, choose
from solution.formats.feature_files import load_features
from solution.formats.hits import read_hits
from solution.model import ModelConfig, build_model, fingerprint, save_checkpoint
from solution.retrieval.encode import split_queries
from solution.retrieval.metrics import mean_recall, recall_at_k
from solution.soups.ingredients import inspect_checkpoint
from solution.stats import id_folds


@pytest.fixture(scope="module")
def ckpts(world, tmp_path_factory):
    """Members: the world's two runs (a, c) and a random ViT-Tiny-W96 (b)."""
    config = ModelConfig("ViT-Tiny-W96", "RBT-Tiny", context_length=32)
    torch.manual_seed(1)
    wide = save_checkpoint(tmp_path_factory.mktemp("w96") / "epoch_1.pt", build_model(config).state_dict(), config)
    return {"a": world.runs[0] / "checkpoints" / "best.pt", "b": wide, "c": world.runs[1] / "checkpoints" / "best.pt"}


def _ens(world, ckpts, out, *members, extra=()):
    paths = " ".join(str(ckpts[m]) for m in members)
    flags = f"--val-data {world.lmdb('valid')} --output {out} --device cpu --cache-dir {out.parent}/cache"
    return f"--members {paths} {flags}".split() + list(extra)


def _predict_ens(world, spec, output, cache, texts=None, images=None):
    texts, images = texts or world.data / "test_texts.jsonl", images or world.lmdb("test") / "imgs"
    data = f"--image-data {images} --text-data {texts} --cache-dir {cache}"
    return f"--ensemble {spec} {data} --top-k 5 --output {output} --device cpu --no-progress".split()


def _features(world, ckpt, out, texts=None, images=None):
    texts, images = texts or world.data / "test_texts.jsonl", images or world.lmdb("test") / "imgs"
    data = f"--image-data {images} --text-data {texts} --resume {ckpt} --device cpu --cache-dir {out.parent}/cache"
    outputs = f"--image-feat-output-path {out}/img.npy --text-feat-output-path {out}/txt.npy"
    features.main(f"--extract-image-feats --extract-text-feats {data} {outputs} --no-progress".split())
    return load_features(out / "txt.npy", "text"), load_features(out / "img.npy", "image")


def _edit(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _halves_problem(**kw):
    """Member 0 ranks gold first on queries 0-1 only, member 1 on queries 2-3 only (gold of q is item q)."""
    a = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=np.float32)
    b = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    eye = np.eye(4, dtype=np.float32)  # gallery = identity: scores are the rows themselves
    return Problem([a, b], [eye, eye], [{0}, {1}, {2}, {3}], **kw)


def test_two_members_right_on_disjoint_halves_get_both_and_no_reranker_can_improve():
    problem, rows = _halves_problem(), np.arange(4)
    for i, right in enumerate(([0, 1], [2, 3])):
        top1 = problem.ranked(problem.alone(i), rows)[:, 0]
        assert [q for q in range(4) if top1[q] == q] == right
    records: list = []
    choice, score, *_ = choose(problem, rows, Plan("zscore", rerankers=("dual_softmax",)), None, 0, records)
    assert choice.weights == (0.5, 0.5) and problem.ranked(choice, rows)[:, 0].tolist() == [0, 1, 2, 3]
    assert score == 100.0 and problem.recall(choice, rows)["r1"] == 100.0
    assert [r["member"] for r in records if r["stage"] == "weights" and r["accepted"]] == [0, 1]
    assert choice.rerank == "none" and not any(r["accepted"] for r in records if r["stage"] == "rerank")


def test_cross_fit_held_out_hits_are_each_folds_choice_not_the_refits():
    """Seed 1 folds queries {0, 1} and {2, 3}: each fold's choice is the other half's member alone, whose hits on
    the held-out half miss at R@1; the refit (both members) hits everything."""
    problem, ids = _halves_problem(), np.array([10, 11, 12, 13])
    assert [f.tolist() for f in id_folds(ids, 2, 1)] == [[0, 1], [2, 3]]
    choice, score, record, (held_ids, held) = choose(problem, np.arange(4), Plan("zscore"), 2, 1, [], ids)
    assert choice.weights == (0.5, 0.5) and score == 100.0 and held_ids.tolist() == ids.tolist()
    assert [c["weights"] for c in record["choices"]] == [[0.0, 1.0], [1.0, 0.0]]
    for fold, c in zip(([0, 1], [2, 3]), record["choices"]):
        assert np.array_equal(held[fold], problem.hits(Choice(tuple(c["weights"]), "zscore"), fold)[1])
    assert held[:, 0].tolist() == [False] * 4 and held[:, 1].all()  # the refit's hits would be all True
    assert record["fold_scores"] == [mean_recall(held[[0, 1]]), mean_recall(held[[2, 3]])]


@pytest.mark.parametrize("seed", range(3))
def test_forward_selection_never_below_its_best_member(seed):
    rng = np.random.default_rng(seed)
    queries = [rng.integers(-4, 5, size=(20, d)).astype(np.float32) for d in (3, 5, 4)]
    galleries = [rng.integers(-4, 5, size=(30, d)).astype(np.float32) for d in (3, 5, 4)]
    problem, rows = Problem(queries, galleries, [{int(g)} for g in rng.integers(0, 30, size=20)]), np.arange(20)
    for norm in ("zscore", "none"):
        choice, score, *_ = choose(problem, rows, Plan(norm, rerankers=("dual_softmax",)), None, 0, [])
        best = max(problem.score(Choice(problem.alone(i).weights, norm), rows) for i in range(3))
        assert score >= best and score == problem.score(choice, rows)


def test_flip_tta_kept_only_when_it_strictly_helps():
    """Flip TTA that scrambles the gallery is dropped; one that restores it is kept (and scored as chosen)."""
    base, rows = _halves_problem(), np.arange(4)
    eye = base.galleries[0]
    shuffled = eye[[1, 2, 3, 0]]  # item i scores as item i+1 would: the gold moves
    for galleries, flipped, kept in (([eye, eye], [shuffled] * 2, False), ([shuffled] * 2, [eye, eye], True)):
        problem = dataclasses.replace(base, galleries=galleries, flipped=flipped)
        records: list = []
        choice, score, *_ = choose(problem, rows, Plan("zscore", tta=("flip",)), None, 0, records)
        (tried,) = [r for r in records if r["stage"] == "tta"]
        plain = problem.score(dataclasses.replace(choice, tta="none"), rows)
        assert tried["accepted"] is kept and (tried["score"] > plain) is kept and choice.tta == ("none", "flip")[kept]
        assert score == problem.score(choice, rows) == max(plain, tried["score"])
    with pytest.raises(SolutionError, match="no flipped gallery"):
        base.score(Choice((0.5, 0.5), tta="flip"), rows)


def test_members_of_two_architectures_ensemble_scored_on_every_query(world, ckpts, tmp_path):
    out = tmp_path / "ens"
    extra = ("--select-split", "0.5", "--rerank", "none,dual_softmax")
    spec = ensemble.main(_ens(world, ckpts, out, "a", "b", extra=extra))
    assert [m["arch"] for m in spec["members"]] == ["ViT-Tiny@RBT-Tiny", "ViT-Tiny-W96@RBT-Tiny"]
    assert [m["embed_dim"] for m in spec["members"]] == [64, 48] and sum(spec["weights"]) == pytest.approx(1.0)
    assert spec["scores"]["select"]["mean_recall"] >= max(m["select"]["mean_recall"] for m in spec["scores"]["members"])
    n, scores = len(split_queries(LMDBSplit(world.lmdb("valid"))).text_ids), spec["scores"]
    assert scores["select"]["queries_scored"] + scores["report"]["queries_scored"] == scores["all"]["queries_scored"]
    for name, scores in [("ensemble", scores), *((f"member{i}", s) for i, s in enumerate(scores["members"]))]:
        ids, hits = read_hits(out / spec["hits"][name])
        assert len(ids) == n and mean_recall(hits) == scores["all"]["mean_recall"]
    assert {r["stage"] for r in read_jsonl(out / "ensemble_log.jsonl")} == {"weights", "rerank"}
    assert fingerprint(ckpts["b"]) == spec["members"][1]["fingerprint"] == inspect_checkpoint(ckpts["b"]).key
    hits = np.load(out / spec["hits"]["ensemble"])
    np.save(out / spec["hits"]["ensemble"], ~hits)  # hits replaced by others of the same shape: refused on read
    with pytest.raises(SolutionError, match="changed since they were written"):
        read_hits(out / spec["hits"]["ensemble"])
    (out / "hits/member0.hits.sha256").unlink()  # as written before digests: still read
    assert len(read_hits(out / spec["hits"]["member0"])[0]) == n
    ensemble.main(_ens(world, ckpts, out, "a", extra=("--weights", "1")))  # again, one member: no member1 left
    assert sorted(p.name.split(".")[0] for p in (out / "hits").iterdir()) == ["ensemble"] * 3 + ["member0"] * 3


def test_folds_cross_fit_held_out_hits_on_the_shared_folds(world, ckpts, tmp_path):
    extra = ("--folds", "3", "--seed", "4", "--norm", "softmax")
    spec = ensemble.main(_ens(world, ckpts, tmp_path / "ens", "a", "b", "c", extra=extra))
    cf = spec["crossfit"]
    assert len(cf["fold_scores"]) == 3 and cf["mean"] == pytest.approx(np.mean(cf["fold_scores"]))
    assert cf["low"] <= cf["mean"] <= cf["high"]
    assert cf["refit_mean_recall"] == spec["scores"]["all"]["mean_recall"] and spec["norm_temperature"] > 0
    ids, held = read_hits(tmp_path / "ens" / cf["hits"])
    assert sorted(ids.tolist()) == sorted(split_queries(LMDBSplit(world.lmdb("valid"))).text_ids)
    assert cf["fold_scores"] == [mean_recall(held[f]) for f in id_folds(ids, 3, 4)]  # the shared folds
    assert {r.get("fold") for r in read_jsonl(tmp_path / "ens" / "ensemble_log.jsonl")} == {0, 1, 2, "refit"}


def test_predict_ensemble_of_one_member_equals_plain_predict(world, ckpts, tmp_path, caplog):
    ensemble.main(_ens(world, ckpts, tmp_path / "ens", "b", extra=("--weights", "1")))
    _features(world, ckpts["b"], tmp_path / "b")
    feats = f"--image-feats {tmp_path}/b/img.npy --text-feats {tmp_path}/b/txt.npy"
    predict.main(f"{feats} --top-k 5 --output {tmp_path}/plain.jsonl".split())
    path = tmp_path / "ens/ensemble.json"
    spec = json.loads(path.read_text())
    for old in (False, True):  # again over its own output; then as an ensemble.json of an older version
        predict.main(_predict_ens(world, path, tmp_path / "ens.jsonl", tmp_path / "cache"))
        assert (tmp_path / "ens.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()
        assert ("predates config digests" in caplog.text) is old
        _edit(path, members=[{k: v for k, v in m.items() if k != "config_sha256"} for m in spec["members"]])
    manifest = json.loads((tmp_path / "ens.json").read_text())
    assert manifest["ensemble"]["weights"] == [1.0] and manifest["ensemble"]["rerank"]["method"] == "none"
    assert [c["path"] for c in manifest["checkpoints"]] == [str(ckpts["b"].resolve())]


def test_predict_ensemble_fuses_as_the_float64_oracle(world, ckpts, tmp_path, capsys, monkeypatch):
    """The submission ranks as the float64 fusion of the members' features; with QB-Norm (forced on: the oracle is
    about the arithmetic), as the inverted softmax of the fused scores over the fused bank of training texts."""
    bank = tmp_path / "bank.jsonl"
    shutil.copy(world.data / "train_texts.jsonl", bank)
    extra = ("--weights", "1", "3", "--rerank", "qb_norm", "--bank", str(bank))
    ensemble.main(_ens(world, ckpts, tmp_path / "ens", "a", "c", extra=extra))
    path = tmp_path / "ens/ensemble.json"
    spec = json.loads(path.read_text())
    members, banks = [], []
    for m in ("a", "c"):
        txt, img = _features(world, ckpts[m], tmp_path / m)
        members.append((txt.feats, img.feats))
        banks.append((_features(world, ckpts[m], tmp_path / f"{m}_bank", texts=bank)[0].feats, img.feats))
    want = fused(members, [1, 3], "zscore")
    for rerank, temperature in (("none", 0.0), ("qb_norm", 0.05)):
        _edit(path, rerank={**spec["rerank"], "method": rerank, "temperature": temperature})
        predict.main(_predict_ens(world, path, tmp_path / "ens.jsonl", tmp_path / "cache"))
        if rerank == "qb_norm":
            want = qb_norm(want, fused(banks, [1, 3], "zscore"), temperature)
        tol = 1e-4 if rerank == "qb_norm" else 1e-6  # float32 fusion (qb_norm: scores / 0.05) vs the float64 oracle
        for q, row in enumerate(read_jsonl(tmp_path / "ens.jsonl")):
            got = want[q][np.searchsorted(img.ids, row["image_ids"])]  # best first, nothing outside the top-5 higher
            assert np.all(np.diff(got) <= tol) and got[-1] >= stable_topk(want[q : q + 1], 5)[0][0, -1] - tol
        manifest = json.loads((tmp_path / "ens.json").read_text())
        assert manifest["ensemble"]["weights"] == [0.25, 0.75] and manifest["ensemble"]["rerank"]["method"] == rerank
    bank.write_text("".join(bank.read_text().splitlines(keepends=True)[:5]))  # a bank cut from its lines: refused
    argv = _predict_ens(world, path, tmp_path / "cut.jsonl", tmp_path / "cache")
    assert "bank.jsonl changed since selection" in one_error_line(capsys, monkeypatch, predict.main, argv)[1]


def test_flip_tta_submission_scores_what_selection_logged(world, ckpts, tmp_path, capsys, monkeypatch):
    """Flip TTA's submission on the validation queries scores exactly what selection logged for it."""
    cache, extra = tmp_path / "cache", ("--weights", "1", "3", "--rerank", "flip")
    spec = ensemble.main(_ens(world, ckpts, tmp_path / "ens", "a", "b", extra=extra))
    (tried,) = [r for r in read_jsonl(tmp_path / "ens/ensemble_log.jsonl") if r["stage"] == "tta"]
    assert spec["tta"] == ("flip" if tried["accepted"] else "none")
    parts = [json.loads(p.read_text())["cache_key_parts"] for p in cache.glob("*.meta.json")]
    assert sorted(p.get("flip", False) for p in parts) == [False, False, True, True]
    path = tmp_path / "ens/ensemble.json"
    _edit(path, tta="flip")
    q = split_queries(LMDBSplit(world.lmdb("valid")))
    texts = tmp_path / "valid_texts.jsonl"
    texts.write_text("".join(json.dumps({"text_id": t, "text": x}) + "\n" for t, x in zip(q.text_ids, q.texts)))
    argv = _predict_ens(world, path, tmp_path / "sub.jsonl", cache, texts=texts, images=world.lmdb("valid") / "imgs")
    predict.main([*argv, "--top-k", "10"])
    manifest = json.loads((tmp_path / "sub.json").read_text())
    assert manifest["ensemble"]["tta"] == "flip" and manifest["features"]["image"]["flip_cache"] == ["hit", "hit"]
    preds = {r["text_id"]: r["image_ids"] for r in read_jsonl(tmp_path / "sub.jsonl")}
    assert recall_at_k(preds, q.gold)["mean_recall"] == tried["score"]


def test_flip_tta_of_a_mirror_invariant_model_equals_no_tta(world, ckpts, tmp_path, monkeypatch):
    """Members whose image tower sees ``(x + flip(x)) / 2``: an image and its mirror give the same tensor."""
    real = make_ensemble.meta_model

    def build(*a, **k):
        model = real(*a, **k)
        inner = model.encode_image
        model.encode_image = lambda x: inner((x + torch.flip(x, dims=[-1])) * 0.5)
        return model

    monkeypatch.setattr(make_ensemble, "meta_model", build)
    enc = dict(device="cpu", precision="amp", batch_size=64, cache_dir=str(tmp_path / "cache"))
    m = make_ensemble.open_member(str(ckpts["a"]))
    make_ensemble.encode_members([m], LMDBSplit(world.lmdb("valid")), ["一件衣服"], flip=True, **enc)
    assert (m.cache, m.flip_cache) == ("miss", "miss")  # the mirrored images: under their own key
    np.testing.assert_allclose(m.flipped, m.gallery, rtol=0, atol=2e-7)
    extra = ("--weights", "1", "1", "--rerank", "flip")
    spec = ensemble.main(_ens(world, ckpts, tmp_path / "ens", "a", "b", extra=extra))
    (tried,) = [r for r in read_jsonl(tmp_path / "ens/ensemble_log.jsonl") if r["stage"] == "tta"]
    assert tried["score"] == spec["scores"]["all"]["mean_recall"] and not tried["accepted"] and spec["tta"] == "none"
    path = tmp_path / "ens/ensemble.json"
    predict.main(_predict_ens(world, path, tmp_path / "plain.jsonl", tmp_path / "cache"))
    _edit(path, tta="flip")
    predict.main(_predict_ens(world, path, tmp_path / "flip.jsonl", tmp_path / "cache"))
    assert (tmp_path / "flip.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()


QB = ("--rerank", "qb_norm", "--bank", "T/B")
BAD = {
    "negative weight": (("a", "b"), ("--weights", "-1", "2"), "must be finite, >= 0"),
    "zero weights": (("a", "b"), ("--weights", "0", "0"), "positive sum"),
    "empty selection half": (("a", "b"), ("--select-split", "0.01"), "empty selection half"),
    "folds with a selection split": (("a",), ("--folds", "2", "--select-split", "0.5"), "without --select-split"),
    "more folds than queries": (("a",), ("--folds", "17"), "need 2 <= K <= 16"),
    "unknown re-ranker": (("a",), ("--rerank", "mirror"), "unknown --rerank 'mirror'"),
    "empty re-ranker": (("a",), ("--rerank", ""), "unknown --rerank ''"),
    "qb_norm without a bank": (("a",), ("--rerank", "qb_norm"), "needs --bank"),
    "bank top-k 0": (("a",), (*QB, "--bank-topk", "0"), "--bank-topk must"),
    "bank top-k negative": (("a",), (*QB, "--bank-topk", "-2"), "--bank-topk must"),
    "empty output": (("a",), ("--output", ""), "--output must not be empty"),
    "a member with no room for its prompt": (("long", "a"), (), "long.pt: text prompt takes"),
    "a member of bare weights": (("bare", "a"), (), "bare.pt: it holds bare weights"),
    "a member with LoRA adapters": (("lora", "a"), (), "lora.pt: it holds unmerged LoRA weights"),
    "a run folder": (("a",), ("--output", "T/run"), "is a run folder"),
    "a soup folder": (("a",), ("--output", "T/soup"), "is a soup folder"),
    "inside an LMDB split": (("a",), ("--output", "T/split/ens"), "an lmdb folder"),
    "inside a data folder": (("a",), ("--output", "T/data/ens"), "a data folder"),
    "in use": (("a",), ("--output", "T/used"), "is in use by"),
    "different galleries": (("a", "c"), (), "different galleries"),
}

FOLDERS = {"run/params.json": "{}", "run/metrics.jsonl": "", "soup/.solution-kind": "soup", "B": ""}
FOLDERS.update({"used/.solution-kind": "ensemble", "split/imgs/data.mdb": "", "data/valid_texts.jsonl": ""})


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_ensemble_is_one_line_and_writes_nothing(world, ckpts, tmp_path, capsys, monkeypatch, case):
    members, extra, words = BAD[case]
    real, calls = make_ensemble.cached_image_features, []

    def dropping(*a, **k):  # the second member's gallery decodes one image less
        ids, feats, info = real(*a, **k)
        calls.append(1)
        return (ids[:-1], feats[:-1], info) if len(calls) == 2 and case == "different galleries" else (ids, feats, info)

    monkeypatch.setattr(make_ensemble, "cached_image_features", dropping)
    sd = torch.load(ckpts["a"], weights_only=True)["state_dict"]
    config = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=8, text_prompt="这是一张很长很长很长的图片")
    torch.save({k.removeprefix("module."): v for k, v in sd.items()}, tmp_path / "bare.pt")
    paths = {**ckpts, "long": save_checkpoint(tmp_path / "long.pt", sd, config), "bare": tmp_path / "bare.pt"}
    lora = {**sd, "module.visual.proj.lora_A.default.weight": torch.zeros(2, 2)}  # adapters left in, merged not said
    paths["lora"] = save_checkpoint(tmp_path / "lora.pt", lora, ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32))
    for name, text in FOLDERS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    argv = _ens(world, paths, tmp_path / "ens", *members) + [x.replace("T/", f"{tmp_path}/") for x in extra]
    with folder_lock(tmp_path / "used" / ".ensemble.lock", "an ensemble run"):
        before = [p for p in sorted(tmp_path.rglob("*")) if "cache" not in p.parts]
        code, line = one_error_line(capsys, monkeypatch, ensemble.main, argv)
    assert code == 2 and words in line, line
    assert [p for p in sorted(tmp_path.rglob("*")) if "cache" not in p.parts] == before
    assert calls == ([1, 1] if case == "different galleries" else [])  # the others: refused before any encoding


def test_member_changed_since_selection_is_refused(world, ckpts, tmp_path, capsys, monkeypatch):
    member = tmp_path / "m.pt"
    shutil.copy(ckpts["b"], member)
    ensemble.main(_ens(world, {"m": member}, tmp_path / "ens", "m"))
    ckpt = torch.load(member, weights_only=True)
    config, sd = ModelConfig.from_dict(ckpt["config"]), ckpt["state_dict"]
    torch.manual_seed(9)
    changes = {"its weights": (build_model(config).state_dict(), {}), "text_prompt": (sd, {"text_prompt": "商品："})}
    changes["context_length"] = (sd, {"context_length": 24})
    argv = _predict_ens(world, tmp_path / "ens/ensemble.json", tmp_path / "sub.jsonl", tmp_path / "cache")
    for words, (weights, change) in changes.items():
        save_checkpoint(member, weights, dataclasses.replace(config, **change))
        code, line = one_error_line(capsys, monkeypatch, predict.main, argv)
        assert code == 2 and "changed since selection" in line and words in line, line
        assert not (tmp_path / "sub.jsonl").exists() and not (tmp_path / "sub.json").exists()


EDITS = {
    "re-ranker as a string": ({"rerank": "dual_softmax"}, "rerank must be an object"),
    "qb_norm without its bank": ({"rerank": {"method": "qb_norm", "temperature": 0.1, "bank": None}}, "its bank"),
    "negative temperature": ({"rerank": {"method": "dual_softmax", "temperature": -0.1}}, "a number >= 0"),
    "unknown version": ({"version": 7}, "unknown ensemble.json version 7"),
    "softmax without a temperature": ({"norm": "softmax", "norm_temperature": None}, "norm_temperature > 0"),
    "bank top-k 0": ({"rerank": {"method": "qb_norm", "temperature": 0.1, "bank": "b", "bank_topk": 0}}, "bank_topk"),
    "unknown augmentation": ({"tta": "rotate"}, "unknown test-time augmentation 'rotate'"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_hand_edited_ensemble_json_is_one_line_before_any_model(world, ckpts, tmp_path, capsys, monkeypatch, case):
    path = tmp_path / "ensemble.json"
    member = {"path": str(ckpts["a"]), "fingerprint": "x"}
    path.write_text(json.dumps({"version": 1, "members": [member], "weights": [1], "norm": "zscore", **EDITS[case][0]}))
    monkeypatch.setattr(make_ensemble, "open_member", None)  # reaching a member would be a traceback
    argv = _predict_ens(world, path, tmp_path / "s.jsonl", tmp_path / "cache")
    code, line = one_error_line(capsys, monkeypatch, predict.main, argv)
    assert code == 2 and EDITS[case][1] in line and sorted(p.name for p in tmp_path.iterdir()) == ["ensemble.json"]
