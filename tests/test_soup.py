"""Model soups (solution.soup): recipes, streaming, caching, refusals, and the soup as a submission.

The main fixture fine-tunes two tiny runs from one shared random base on the demo data with
``solution.train.main`` (session-scoped), and soups their checkpoints once with all three methods,
a selection split and an interpolation; most tests read that one output. Mechanics that need no
real scores (refusals, dedupe, memory, dtype) use synthetic ingredients: a base plus small
random perturbations.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref

import pytest
import torch

from solution import soup
from solution.common import SolutionError, read_jsonl
from solution.data.lmdb_io import LMDBSplit, write_images
from solution.data.make_lmdb import prepare
from solution.model import ModelConfig, build_model, clean_state_dict, read_checkpoint, save_checkpoint
from solution.retrieval import encode
from solution.soups import ingredients, weights

METHODS = ("uniform", "greedy", "pairwise")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # On a loaded shared CPU two threads are several times slower than one for these tiny models.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from solution.data.synthetic import generate

    data = tmp_path_factory.mktemp("soup_demo")
    generate(data, preset="tiny", messy=False, train_queries=24, valid_queries=16, images_per_query=3)
    prepare(data, ["train", "valid"], workers=1, progress=False)
    config = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32)
    torch.manual_seed(0)
    save_checkpoint(data / "base.pt", build_model(config).state_dict(), config)
    return data


@pytest.fixture(scope="session")
def trained(demo):
    """Two short fine-tunes from the shared base (different lr and seed), 3 epochs each."""
    import solution.training.trainer as train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, lr in enumerate(("2e-3", "7e-4")):
            train.main(
                [
                    "--train-data",
                    str(demo / "lmdb/train"),
                    "--val-data",
                    str(demo / "lmdb/valid"),
                    "--resume",
                    str(demo / "base.pt"),
                    "--logs",
                    str(demo / "logs"),
                    "--name",
                    f"run{i}",
                    "--batch-size",
                    "24",
                    "--max-epochs",
                    "3",
                    "--lr",
                    lr,
                    "--warmup",
                    "1",
                    "--seed",
                    str(i),
                    "--context-length",
                    "32",
                    "--precision",
                    "fp32",
                    "--device",
                    "cpu",
                    "--num-workers",
                    "0",
                    "--valid-num-workers",
                    "0",
                    "--no-plot",
                    "--no-progress",
                ]
            )
    finally:
        torch.set_num_threads(before)
    return demo


@pytest.fixture(scope="session")
def souped(trained):
    out = trained / "soups"
    summary = soup.main(
        [
            "--checkpoints",
            str(trained / "logs/*/checkpoints/*.pt"),
            "--val-data",
            str(trained / "lmdb/valid"),
            "--method",
            ",".join(METHODS),
            "--select-split",
            "0.5",
            "--seed",
            "3",
            "--interpolate-with",
            str(trained / "base.pt"),
            "--alphas",
            "0.5,0.9",
            "--output",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "32",
        ]
    )
    return out, summary


def _sd(path):
    return {k: v.float() for k, v in clean_state_dict(read_checkpoint(path)["state_dict"]).items()}


def _weighted(members, weights):
    total = None
    for path, w in zip(members, weights):
        sd = _sd(path)
        total = {k: w * v for k, v in sd.items()} if total is None else {k: total[k] + w * sd[k] for k in total}
    return total


def _rows(out, method):
    return read_jsonl(out / method / "soup_log.jsonl")


# ---------------------------------------------------------------- acceptance on trained runs


def test_greedy_never_below_its_first_ingredient(souped):
    out, summary = souped
    rows = _rows(out, "greedy")
    singles = [r for r in rows if r["method"] == "ingredient"]
    greedy = [r for r in rows if r["method"] == "greedy"]
    assert len(singles) == 6  # 2 runs x 3 epochs: best.pt and epoch_latest.pt are copies, used once
    assert len(summary["duplicates"]) == 4
    assert all(p.endswith(("best.pt", "epoch_latest.pt")) for p in summary["duplicates"])
    best_single = max(r["mean_recall"] for r in singles)
    assert greedy[0]["round"] == 0 and greedy[0]["mean_recall"] == best_single and greedy[0]["kept"]
    # each kept candidate strictly improves on the soup before it; dropped ones do not
    current = greedy[0]["mean_recall"]
    for r in greedy[1:]:
        assert r["kept"] == (r["mean_recall"] > current)
        if r["kept"]:
            current = r["mean_recall"]
    assert len(greedy) == len(singles)  # every ingredient was tried once
    # the soup is the last kept candidate, then interpolation (alpha 1 = that soup) keeps only strict gains
    interp = [r for r in rows if r["method"] == "greedy+interpolate"]
    assert interp[0]["alpha"] == 1.0 and interp[0]["mean_recall"] == current
    final = summary["soups"]["greedy"]
    assert final["mean_recall"] == [r for r in interp if r["kept"]][-1]["mean_recall"]


def test_soup_weights_are_the_average_its_log_names(souped):
    out, _ = souped
    for method in METHODS:
        ckpt = read_checkpoint(out / method / "soup.pt")
        recipe = ckpt["recipe"]
        assert recipe["method"] == method and abs(sum(recipe["weights"]) - 1) < 1e-9
        expected = _weighted(recipe["members"], recipe["weights"])
        got = {k: v.float() for k, v in clean_state_dict(ckpt["state_dict"]).items()}
        assert set(got) == set(expected)
        for k in got:
            torch.testing.assert_close(got[k], expected[k], atol=2e-6, rtol=1e-5, msg=f"{method}: {k}")
        # the recipe is the log's best kept candidate of that method
        kept = [r for r in _rows(out, method) if r["method"].startswith(method) and r["kept"]]
        best = max(kept, key=lambda r: r["mean_recall"])
        assert best["mean_recall"] == recipe["score"]["mean_recall"]
        if method != "pairwise" or len(recipe["members"]) > 1:
            assert sorted(zip(best["members"], best["weights"])) == sorted(zip(recipe["members"], recipe["weights"]))
    greedy = read_checkpoint(out / "greedy" / "soup.pt")["recipe"]
    assert len(set(greedy["weights"])) == 1  # a running average: uniform over the kept members
    uniform = read_checkpoint(out / "uniform" / "soup.pt")["recipe"]
    members = [m for m in uniform["members"] if m != uniform.get("interpolate_with")]
    assert len(members) == len([r for r in _rows(out, "uniform") if r["method"] == "ingredient"])


def test_pairwise_follows_its_stopping_rule(souped):
    out, _ = souped
    rows = _rows(out, "pairwise")
    pool = {r["members"][0]: r["mean_recall"] for r in rows if r["method"] == "ingredient"}
    rounds = [r for r in rows if r["method"] == "pairwise"]
    assert rounds, "pairwise tried no merge"
    for i, r in enumerate(rounds, 1):
        assert r["round"] == i
        ranked = sorted(pool.items(), key=lambda kv: -kv[1])
        assert sorted(r["pair_scores"], reverse=True) == [ranked[0][1], ranked[1][1]]  # the two best of the pool
        assert r["kept"] == (r["mean_recall"] > min(r["pair_scores"]))  # beats the worse member
        if not r["kept"]:
            assert r["mean_recall"] <= min(r["pair_scores"])  # at or below both: the end
            assert i == len(rounds)
            break
        merged = out / "pairwise" / f"merged_round{i}.pt"
        assert merged.is_file()
        worse = r["pair"][1]
        del pool[worse]
        pool[str(merged)] = r["mean_recall"]
    final = read_checkpoint(out / "pairwise" / "soup.pt")["recipe"]["score"]["mean_recall"]
    assert final == max(pool.values())


def test_soup_scores_the_same_through_plain_cn_clip_predict_and_evaluate(souped, trained, tmp_path):
    from cn_clip.clip.model import CLIP

    from solution import evaluate, features, predict
    from solution.retrieval.encode import encode_images

    out, summary = souped
    path = out / "greedy" / "soup.pt"
    ckpt = read_checkpoint(path)
    # upstream's loader: strip "module.", strict load into an unmodified cn_clip CLIP
    model = CLIP(**ckpt["config"]["model_info"])
    model.load_state_dict({k[len("module.") :]: v for k, v in ckpt["state_dict"].items()}, strict=True)
    # the submission path: features CLI -> predict -> evaluate, on the selection queries
    sel = set(summary["selection"]["select_text_ids"])
    texts = [r for r in read_jsonl(trained / "valid_texts.jsonl") if r["text_id"] in sel]
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"text_id": r["text_id"], "text": r["text"]}, ensure_ascii=False) + "\n" for r in texts),
        encoding="utf-8",
    )
    (tmp_path / "gold.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in texts), encoding="utf-8"
    )
    features.main(
        [
            "--extract-image-feats",
            "--extract-text-feats",
            "--image-data",
            str(trained / "lmdb/valid"),
            "--text-data",
            str(tmp_path / "q.jsonl"),
            "--resume",
            str(path),
            "--device",
            "cpu",
            "--image-feat-output-path",
            str(tmp_path / "img.npy"),
            "--text-feat-output-path",
            str(tmp_path / "txt.npy"),
            "--precision",
            "fp32",
            "--no-cache",
            "--no-progress",
        ]
    )
    predict.main(
        [
            "--image-feats",
            str(tmp_path / "img.npy"),
            "--text-feats",
            str(tmp_path / "txt.npy"),
            "--top-k",
            "10",
            "--output",
            str(tmp_path / "pred.jsonl"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    result = evaluate.main([str(tmp_path / "gold.jsonl"), str(tmp_path / "pred.jsonl"), str(tmp_path / "score.json")])
    logged = summary["soups"]["greedy"]
    assert result["scoreJson"]["mean_recall"] == pytest.approx(logged["mean_recall"], abs=1e-9)
    for k in ("r1", "r5", "r10"):
        assert result["scoreJson"][k] == pytest.approx(logged[k], abs=1e-9)
    # the plain upstream model and ours give the same features
    import numpy as np

    ids, feats = encode_images(model, trained / "lmdb/valid", ModelConfig.from_dict(ckpt["config"]))
    ours = np.load(tmp_path / "img.npy")
    order = np.argsort(ids)
    ours_ids = np.load(tmp_path / "img.ids.npy")
    np.testing.assert_allclose(feats[order], ours[np.argsort(ours_ids)], atol=1e-5)


def test_select_split_reports_the_other_part(souped):
    out, summary = souped
    sel = summary["selection"]
    assert sel["select_text_ids"] and sel["report_text_ids"]
    assert not set(sel["select_text_ids"]) & set(sel["report_text_ids"])
    assert len(sel["select_text_ids"]) == 8  # half of 16 queries
    n_sel, n_rep = len(sel["select_text_ids"]), len(sel["report_text_ids"])
    for method in METHODS:
        s = summary["soups"][method]
        assert "report" in s
        # all queries = the query-weighted mean of the two parts (recall is a per-query average)
        for k in ("r1", "r5", "r10", "mean_recall"):
            assert s["all"][k] == pytest.approx((n_sel * s[k] + n_rep * s["report"][k]) / (n_sel + n_rep))
        assert all("report" in r and "all" in r for r in _rows(out, method) if r["mean_recall"] is not None)


def test_interpolation_logged_and_best_soup_linked(souped):
    out, summary = souped
    for method in METHODS:
        interp = [r for r in _rows(out, method) if r["method"] == f"{method}+interpolate"]
        assert [r["alpha"] for r in interp] == [1.0, 0.5, 0.9]
        assert interp[1]["members"][-1] == str(out.parent / "base.pt")
        assert interp[1]["weights"][-1] == pytest.approx(0.5)
    best = summary["method"]
    assert (out / "soup.pt").samefile(out / best / "soup.pt")
    assert summary["soups"][best]["mean_recall"] == max(s["mean_recall"] for s in summary["soups"].values())


def test_rerun_uses_the_score_cache(souped, trained, monkeypatch, tmp_path):
    out, summary = souped
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    shutil.copy(out / "score_cache.json", again_dir / "score_cache.json")

    def boom(*a, **k):
        raise AssertionError("re-scored a cached candidate")

    monkeypatch.setattr("solution.retrieval.encode.encode_images", boom)
    again = soup.main(
        [
            "--checkpoints",
            str(trained / "logs/*/checkpoints/*.pt"),
            "--val-data",
            str(trained / "lmdb/valid"),
            "--method",
            "greedy",
            "--select-split",
            "0.5",
            "--seed",
            "3",
            "--interpolate-with",
            str(trained / "base.pt"),
            "--alphas",
            "0.5,0.9",
            "--output",
            str(again_dir),
            "--device",
            "cpu",
        ]
    )
    assert again["soups"]["greedy"]["mean_recall"] == summary["soups"]["greedy"]["mean_recall"]
    assert again["soups"]["greedy"]["members"] == summary["soups"]["greedy"]["members"]
    assert all(r.get("cached") for r in read_jsonl(again_dir / "soup_log.jsonl") if r["mean_recall"] is not None)
    torch.testing.assert_close(_sd(again_dir / "soup.pt"), _sd(out / "greedy" / "soup.pt"), atol=0, rtol=0)


def test_score_cache_knows_the_validation_lmdb_by_its_content(souped, trained, monkeypatch, tmp_path):
    """The same LMDB elsewhere (another path and modification time) is the same validation data: cached
    scores answer; an LMDB with other images is not (its scores are computed again)."""
    out, summary = souped
    moved = tmp_path / "moved"
    shutil.copytree(trained / "lmdb" / "valid", moved)
    for f in moved.rglob("*.mdb"):
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(out / "score_cache.json", tmp_path / name / "score_cache.json")
    args = [
        "--checkpoints",
        str(trained / "logs/run0/checkpoints/epoch_1.pt"),
        "--method",
        "uniform",
        "--select-split",
        "0.5",
        "--seed",
        "3",
        "--device",
        "cpu",
    ]
    real = encode.encode_images
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(encode, "encode_images", counting)
    again = soup.main([*args, "--val-data", str(moved), "--output", str(tmp_path / "a")])
    assert calls == [] and again["best_single"] == {  # the hits files stay in the first folder: none named here
        k: v for k, v in _single(summary, "run0/checkpoints/epoch_1.pt").items() if k != "hits"
    }
    split = LMDBSplit(moved)
    images = [(i, split.image_b64(i)) for i in split.image_ids()]
    split.close()
    write_images(moved, [(i, images[-1][1] if n == 0 else b) for n, (i, b) in enumerate(images)])  # one image changed
    soup.main([*args, "--val-data", str(moved), "--output", str(tmp_path / "b")])
    assert calls  # re-scored


def _single(summary, suffix):
    ing = next(i for i in summary["ingredients"] if i["path"].endswith(suffix))
    return {"path": ing["path"], **{k: v for k, v in ing.items() if k not in ("path", "fingerprint")}}


def test_soup_resumes_in_train(souped, trained):
    import solution.training.trainer as train

    out, _ = souped
    result = train.main(
        [
            "--train-data",
            str(trained / "lmdb/train"),
            "--resume",
            str(out / "greedy" / "soup.pt"),
            "--logs",
            str(trained / "logs2"),
            "--name",
            "from_soup",
            "--batch-size",
            "24",
            "--max-steps",
            "1",
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--no-plot",
            "--no-progress",
            "--precision",
            "fp32",
            "--warmup",
            "1",
        ]
    )
    assert read_checkpoint(result["last_checkpoint"])["config"]["vision_model"] == "ViT-Tiny"


def test_compare_reads_the_soup_folder(souped, trained, tmp_path):
    from solution import compare

    out, summary = souped
    text = compare.main([str(trained / "logs"), str(out), "--plot", str(tmp_path / "c.png"), "--csv"])
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(text)))
    soups = {r["name"].split("/")[-1]: r for r in rows if r["kind"] == "soup"}
    assert set(soups) == set(METHODS)
    for m in METHODS:
        assert float(soups[m]["mean_recall"]) == pytest.approx(summary["soups"][m]["all"]["mean_recall"])
        assert float(soups[m]["select_mr"]) == pytest.approx(summary["soups"][m]["mean_recall"])
        assert float(soups[m]["held_out_mr"]) == pytest.approx(summary["soups"][m]["report"]["mean_recall"])
    assert {r["kind"] for r in rows} == {"run", "soup"}
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_soup_stores_per_query_hits_and_its_significance(souped, trained, tmp_path):
    """Every scored candidate's hits over all the validation queries are stored (the official mean recall
    of each file equals its score, digit for digit); each summary holds the paired bootstrap against the
    best single ingredient (a soup that is that ingredient: exactly 0 in [0, 0]); compare shows it."""
    from solution import compare
    from solution.formats.hits import read_hits
    from solution.retrieval.metrics import mean_recall
    from solution.stats import paired_bootstrap

    out, summary = souped
    split = LMDBSplit(trained / "lmdb" / "valid")
    n_queries = len(split.queries())
    split.close()
    ref = summary["best_single"]
    ref_ids, ref_hits = read_hits(out / ref["hits"])
    assert ref_hits.shape == (n_queries, 3) and mean_recall(ref_hits) == ref["all"]["mean_recall"]
    sig = summary["significance"]
    assert sig["reference"] == ref["path"] and sig["n_resamples"] >= 1000 and set(sig["soups"]) == set(METHODS)
    for m in METHODS:
        s = summary["soups"][m]
        ids, hits = read_hits(out / s["hits"])
        assert ids.tolist() == ref_ids.tolist() and mean_recall(hits) == s["all"]["mean_recall"]
        b = paired_bootstrap(hits, ref_hits, n_resamples=sig["n_resamples"], seed=sig["seed"])
        assert sig["soups"][m] == {"diff": b.diff, "low": b.low, "high": b.high, "significant": b.significant}
        if hits.tolist() == ref_hits.tolist():
            assert (b.diff, b.low, b.high, b.significant) == (0.0, 0.0, 0.0, False)
        method_summary = json.loads((out / m / "summary.json").read_text(encoding="utf-8"))
        assert method_summary["significance"]["soups"][m] == sig["soups"][m]
    for row in _rows(out, "greedy"):
        if row["mean_recall"] is not None:
            assert (out / row["hits"]).is_file()
    text = compare.main([str(out), "--no-plot", "--csv"])
    import csv
    import io

    rows = {r["name"].split("/")[-1]: r for r in csv.DictReader(io.StringIO(text))}
    for m in METHODS:
        assert float(rows[m]["vs_ref"]) == pytest.approx(sig["soups"][m]["diff"])
        assert float(rows[m]["ci_low"]) == pytest.approx(sig["soups"][m]["low"])
        assert rows[m]["note"].startswith("vs best ingredient ") and os.path.basename(ref["path"]) in rows[m]["note"]


# ---------------------------------------------------------------- synthetic ingredients


@pytest.fixture
def synth(tmp_path, demo):
    """A tiny base and 3 perturbed copies (fp32, context length 32), plus the demo's valid LMDB."""
    config = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32)
    torch.manual_seed(0)
    base = build_model(config).state_dict()
    paths = []
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(save_checkpoint(tmp_path / f"runs/r{i}/checkpoints/epoch_1.pt", sd, config))
    return tmp_path, paths, config


def test_uniform_no_score_streams_one_checkpoint_at_a_time(synth, monkeypatch):
    tmp, paths, _ = synth
    alive = []
    real = ingredients.read_checkpoint

    def tracking(path, **kw):
        ckpt = real(path, **kw)
        alive[:] = [r for r in alive if r() is not None]
        assert len(alive) == 0, "a second checkpoint was read while another was still held"
        alive.append(weakref.ref(ckpt["state_dict"]["module.logit_scale"]))
        return ckpt

    monkeypatch.setattr(ingredients, "read_checkpoint", tracking)  # inspecting
    monkeypatch.setattr(weights, "read_checkpoint", tracking)  # averaging
    summary = soup.main(
        [
            "--checkpoints",
            str(tmp / "runs/*/checkpoints/*.pt"),
            "--method",
            "uniform",
            "--no-score",
            "--output",
            str(tmp / "out"),
        ]
    )
    got = _sd(tmp / "out" / "soup.pt")
    expected = _weighted(paths, [1 / 3] * 3)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-6)
    assert summary["soups"]["uniform"]["weights"] == pytest.approx([1 / 3] * 3)
    assert not (tmp / "out" / "score_cache.json").read_text().count('"scores": {"')


def test_duplicates_are_used_once(synth):
    tmp, paths, config = synth
    ckpt = read_checkpoint(paths[0])
    # epoch_latest.pt: the same weights plus resumable state, and other float tensors elsewhere
    torch.save(
        {**ckpt, "optimizer": {"state": {}, "param_groups": []}, "epoch": 2},
        tmp / "runs/r0/checkpoints/epoch_latest.pt",
    )
    summary = soup.main(
        [
            "--checkpoints",
            str(tmp / "runs/*/checkpoints/*.pt"),
            "--method",
            "uniform",
            "--no-score",
            "--output",
            str(tmp / "out"),
        ]
    )
    assert summary["duplicates"] == {str(tmp / "runs/r0/checkpoints/epoch_latest.pt"): str(paths[0])}
    assert len(summary["soups"]["uniform"]["members"]) == 3


@pytest.mark.parametrize("what", ["context_length", "text_prompt", "architecture"])
def test_mismatched_ingredients_are_refused_before_any_work(synth, what, monkeypatch):
    tmp, paths, config = synth
    odd = tmp / "odd" / "odd.pt"
    if what == "architecture":
        cfgdir = tmp / "cfgs"
        cfgdir.mkdir()
        info = dict(config.model_info)
        vision = {
            k: info[k]
            for k in ("embed_dim", "image_resolution", "vision_width", "vision_patch_size", "vision_head_width")
        }
        (cfgdir / "ViT-Tiny1.json").write_text(json.dumps({**vision, "vision_layers": 1}))
        monkeypatch.setattr("solution.model.registry.EXTRA_CONFIG_DIRS", (cfgdir,))
        other = ModelConfig("ViT-Tiny1", "RBT-Tiny", context_length=32)
        save_checkpoint(odd, build_model(other).state_dict(), other)
    else:
        other = ModelConfig(
            "ViT-Tiny",
            "RBT-Tiny",
            context_length=24 if what == "context_length" else 32,
            text_prompt="一张图片：" if what == "text_prompt" else "",
        )
        save_checkpoint(odd, read_checkpoint(paths[1])["state_dict"], other)
    with pytest.raises(SolutionError) as e:
        soup.main(
            [
                "--checkpoints",
                str(tmp / "runs/*/checkpoints/*.pt"),
                str(odd),
                "--method",
                "uniform",
                "--output",
                str(tmp / "out"),
                "--no-score",
            ]
        )
    assert "odd.pt" in str(e.value)
    assert ("ViT-Tiny1" in str(e.value)) if what == "architecture" else (what in str(e.value))
    assert not (tmp / "out").exists()


def test_bad_inputs_give_one_clear_error(synth, demo):
    tmp, paths, _ = synth
    run = ["--method", "uniform", "--no-score", "--output", str(tmp / "out")]
    with pytest.raises(SolutionError, match="no checkpoint matches"):
        soup.main(["--checkpoints", str(tmp / "nothing/*.pt"), *run])
    trunc = tmp / "bad" / "truncated.pt"
    trunc.parent.mkdir()
    trunc.write_bytes(paths[0].read_bytes()[:5000])
    with pytest.raises(SolutionError, match="truncated.pt is not a readable checkpoint"):
        soup.main(["--checkpoints", str(paths[0]), str(trunc), *run])
    text = tmp / "bad" / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(SolutionError, match="notes.pt"):
        soup.main(["--checkpoints", str(text), *run])
    torch.save({"weights": [1, 2]}, tmp / "bad" / "other.pt")
    with pytest.raises(SolutionError, match="other.pt has no 'state_dict'"):
        soup.main(["--checkpoints", str(tmp / "bad" / "other.pt"), *run])
    assert not (tmp / "out").exists()
    # validation data without texts: an image-only LMDB, or test texts without gold
    shutil.copytree(demo / "lmdb" / "valid" / "imgs", tmp / "imgonly" / "imgs")
    scored = ["--checkpoints", str(paths[0]), "--method", "greedy", "--output", str(tmp / "out")]
    with pytest.raises(SolutionError, match="has no texts"):
        soup.main([*scored, "--val-data", str(tmp / "imgonly")])
    with pytest.raises(SolutionError, match="no gold image_ids"):
        soup.main([*scored, "--val-data", str(tmp / "imgonly"), "--val-texts", str(demo / "test_texts.jsonl")])
    with pytest.raises(SolutionError, match="--val-data is required"):
        soup.main(scored)
    assert not (tmp / "out").exists()


def test_val_texts_give_the_same_scores_as_pairs(synth, demo):
    tmp, paths, _ = synth
    args = ["--checkpoints", str(paths[0]), "--method", "greedy", "--device", "cpu"]
    a = soup.main([*args, "--val-data", str(demo / "lmdb/valid"), "--output", str(tmp / "a")])
    shutil.copytree(demo / "lmdb" / "valid" / "imgs", tmp / "imgonly" / "imgs")
    b = soup.main(
        [
            *args,
            "--val-data",
            str(tmp / "imgonly"),
            "--val-texts",
            str(demo / "valid_texts.jsonl"),
            "--output",
            str(tmp / "b"),
        ]
    )
    assert a["best_single"]["mean_recall"] == b["best_single"]["mean_recall"]
    assert a["best_single"]["r10"] == b["best_single"]["r10"]


def test_gallery_decoded_and_queries_tokenised_once_per_soup_run(synth, demo, monkeypatch):
    """Every candidate is scored from one decoding of the validation gallery and one tokenisation of the
    queries, with the scores plain validation (decoding for each model) gives each candidate."""
    from solution.data import datasets
    from solution.retrieval.encode import evaluate_split

    tmp, paths, config = synth
    decoded, tokenised = [], []
    real_decode, real_tokenize = datasets.decode_image, encode.tokenize
    monkeypatch.setattr(datasets, "decode_image", lambda b64: decoded.append(1) or real_decode(b64))
    monkeypatch.setattr(encode, "tokenize", lambda *a, **k: tokenised.append(1) or real_tokenize(*a, **k))
    soup.main(
        [
            "--checkpoints",
            str(tmp / "runs/*/checkpoints/*.pt"),
            "--method",
            "uniform",
            "--device",
            "cpu",
            "--val-data",
            str(demo / "lmdb/valid"),
            "--output",
            str(tmp / "out"),
            "--batch-size",
            "16",
        ]
    )
    rows = [r for r in read_jsonl(tmp / "out" / "soup_log.jsonl") if "mean_recall" in r]
    assert len(rows) >= 4  # three ingredients and the soup
    images = LMDBSplit(demo / "lmdb/valid").num_images
    assert len(decoded) == images
    monkeypatch.setattr(datasets, "decode_image", real_decode)
    monkeypatch.setattr(encode, "tokenize", real_tokenize)
    batches = len(encode.text_batches(encode.split_queries(LMDBSplit(demo / "lmdb/valid")).texts, config, 16))
    assert len(tokenised) == batches
    for row in rows:
        model = build_model(config)
        model.load_state_dict(_weighted(row["members"], row["weights"]))
        plain = evaluate_split(model.eval(), demo / "lmdb/valid", config, batch_size=16)
        assert {k: row[k] for k in ("r1", "r5", "r10", "mean_recall")} == {
            k: plain[k] for k in ("r1", "r5", "r10", "mean_recall")
        }, row["members"]


def test_fp16_ingredients_give_an_fp16_soup_scored_as_saved(synth, demo):
    tmp, paths, config = synth
    halves = []
    for i, p in enumerate(paths):
        sd = {k: v.half() for k, v in read_checkpoint(p)["state_dict"].items()}
        halves.append(save_checkpoint(tmp / f"half/h{i}.pt", sd, config))
    summary = soup.main(
        [
            "--checkpoints",
            str(tmp / "half/*.pt"),
            "--method",
            "uniform",
            "--val-data",
            str(demo / "lmdb/valid"),
            "--output",
            str(tmp / "out"),
            "--device",
            "cpu",
        ]
    )
    ckpt = read_checkpoint(tmp / "out" / "soup.pt")
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float16}
    expected = _weighted(halves, [1 / 3] * 3)
    for k, v in clean_state_dict(ckpt["state_dict"]).items():
        torch.testing.assert_close(v.float(), expected[k], atol=1e-3, rtol=1e-3)
    # the logged score is the saved fp16 soup's
    from solution.model import load_model
    from solution.retrieval.encode import evaluate_split

    model, cfg, _ = load_model(tmp / "out" / "soup.pt")
    assert evaluate_split(model, demo / "lmdb/valid", cfg)["mean_recall"] == summary["soups"]["uniform"]["mean_recall"]


def test_from_study_takes_the_top_complete_trials(synth):
    tmp, paths, config = synth
    study = tmp / "study"
    rows = [(0, "COMPLETE", 30.0), (1, "PRUNED", 99.0), (2, "COMPLETE", 50.0), (3, "COMPLETE", 40.0), (4, "FAIL", "")]
    for number, _, _ in rows:
        ckpt_dir = study / "trials" / f"{number:04d}" / "checkpoints"
        ckpt_dir.mkdir(parents=True)
        shutil.copy(paths[number % 3], ckpt_dir / "best.pt")
    (study / "trials.csv").write_text(
        "number,state,value,run_dir,params_lr\n"
        + "".join(f"{n},{s},{v},{study / 'trials' / f'{n:04d}'},0.1\n" for n, s, v in rows)
    )
    got = ingredients.study_checkpoints(study, 2)
    assert [p.parent.parent.name for p in got] == ["0002", "0003"]
    with pytest.raises(SolutionError, match="no complete trial"):
        (tmp / "empty").mkdir()
        (tmp / "empty" / "trials.csv").write_text("number,state,value,run_dir\n0,FAIL,,x\n")
        ingredients.study_checkpoints(tmp / "empty", 2)


def test_unmerged_lora_is_refused(synth):
    tmp, paths, config = synth
    sd = dict(read_checkpoint(paths[0])["state_dict"])
    sd["module.visual.transformer.resblocks.0.attn.lora_A.default.weight"] = torch.zeros(4, 64)
    save_checkpoint(tmp / "lora.pt", sd, config)
    with pytest.raises(SolutionError, match="unmerged LoRA"):
        soup.main(
            ["--checkpoints", str(tmp / "lora.pt"), "--method", "uniform", "--no-score", "--output", str(tmp / "out")]
        )


def test_from_study_passes_over_trials_the_best_cannot_be_souped_with(synth, caplog):
    """A search that varied the prompt: the second-best trial has another prompt and is skipped."""
    tmp, paths, config = synth
    study = tmp / "study_prompts"
    other = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32, text_prompt="图片：")
    scores = {0: 50.0, 1: 45.0, 2: 40.0}
    for number in scores:
        ckpt_dir = study / "trials" / f"{number:04d}" / "checkpoints"
        sd = read_checkpoint(paths[number])["state_dict"]
        save_checkpoint(ckpt_dir / "best.pt", sd, other if number == 1 else config)
    (study / "trials.csv").write_text(
        "number,state,value,run_dir\n"
        + "".join(f"{n},COMPLETE,{v},{study / 'trials' / f'{n:04d}'}\n" for n, v in scores.items())
    )
    got = ingredients.study_checkpoints(study, 2)
    assert [p.parent.parent.name for p in got] == ["0000", "0002"]
    assert "passing over trial 1" in caplog.text


# ---------------------------------------------------------------- --folds cross-fitting


def _fold_score(demo, config, members, weights_, text_ids):
    """A fold's held-out mean recall, recomputed from its chosen soup's weights through plain validation."""
    from solution.retrieval.encode import evaluate_split

    model = build_model(config)
    model.load_state_dict(_weighted(members, weights_))
    return evaluate_split(model.eval(), demo / "lmdb/valid", config, text_ids=text_ids)["mean_recall"]


def test_folds_cross_fit_each_query_once_and_ship_the_refit(synth, demo, monkeypatch):
    tmp, paths, config = synth
    args = [
        "--checkpoints",
        str(tmp / "runs/*/checkpoints/*.pt"),
        "--method",
        "greedy,pairwise,uniform",
        "--val-data",
        str(demo / "lmdb/valid"),
        "--device",
        "cpu",
        "--seed",
        "5",
    ]
    calls = []
    real = encode.score_parts
    monkeypatch.setattr("solution.soups.scoring.score_parts", lambda *a, **k: calls.append(1) or real(*a, **k))
    crossed = soup.main([*args, "--folds", "4", "--output", str(tmp / "cf")])
    n_cf = len(calls)
    plain = soup.main([*args, "--output", str(tmp / "plain")])
    all_ids = sorted(r["text_id"] for r in read_jsonl(demo / "valid_texts.jsonl"))
    for m in ("greedy", "pairwise", "uniform"):
        cf = crossed["soups"][m]["crossfit"]
        assert cf["k"] == 4 and len(cf["fold_scores"]) == 4 and len(cf["folds"]) == 4
        # the folds partition the queries: each held out exactly once
        assert sorted(t for f in cf["folds"] for t in f) == all_ids
        assert cf["low"] <= cf["mean"] <= cf["high"]
        # each held-out score recomputed from the fold's chosen soup; the mean is theirs
        again = [
            _fold_score(demo, config, fm["members"], fm["weights"], fold)
            for fm, fold in zip(cf["fold_members"], cf["folds"])
        ]
        assert cf["fold_scores"] == pytest.approx(again, abs=1e-9)
        assert cf["mean"] == pytest.approx(sum(again) / 4, abs=1e-9)
        # the refit is the soup chosen without --folds
        assert crossed["soups"][m]["members"] == plain["soups"][m]["members"]
        assert crossed["soups"][m]["weights"] == plain["soups"][m]["weights"]
        assert crossed["soups"][m]["mean_recall"] == plain["soups"][m]["mean_recall"]
        torch.testing.assert_close(_sd(tmp / "cf" / m / "soup.pt"), _sd(tmp / "plain" / m / "soup.pt"), atol=0, rtol=0)
        assert "crossfit" not in plain["soups"][m]
        assert (tmp / "cf" / m / "crossfit" / "fold4" / "soup_log.jsonl").is_file()
    saved = json.loads((tmp / "cf" / "greedy" / "summary.json").read_text())
    assert saved["soups"]["greedy"]["crossfit"] == crossed["soups"]["greedy"]["crossfit"]
    # compare's held-out column: the cross-fit mean (none without --folds or --select-split)
    from solution.report.folders import read_soup

    [entry] = read_soup(tmp / "cf" / "greedy", "cf")
    assert entry.held_out == saved["soups"]["greedy"]["crossfit"]["mean"]
    assert entry.extra["crossfit"]["low"] == saved["soups"]["greedy"]["crossfit"]["low"]
    assert read_soup(tmp / "plain" / "greedy", "plain")[0].held_out is None
    # the folds reuse each candidate's per-query hits: every distinct candidate is encoded once
    keys = {
        tuple(zip(r["members"], r["weights"]))
        for m in ("greedy", "pairwise", "uniform")
        for d in [tmp / "cf" / m, *sorted((tmp / "cf" / m / "crossfit").iterdir())]
        for r in read_jsonl(d / "soup_log.jsonl")
        if r["mean_recall"] is not None
    }
    assert n_cf == len(keys)
    # a rerun of the cross-fit with the cache (and its hits files) encodes nothing
    calls.clear()
    (tmp / "cf2").mkdir()
    shutil.copy(tmp / "cf" / "score_cache.json", tmp / "cf2" / "score_cache.json")
    shutil.copytree(tmp / "cf" / "hits", tmp / "cf2" / "hits")
    rerun = soup.main([*args, "--folds", "4", "--output", str(tmp / "cf2")])
    assert not calls
    assert rerun["soups"]["greedy"]["crossfit"]["fold_scores"] == crossed["soups"]["greedy"]["crossfit"]["fold_scores"]


def test_bad_folds_give_one_error_line(synth, demo):
    tmp, paths, _ = synth
    args = [
        "--checkpoints",
        str(paths[0]),
        str(paths[1]),
        "--method",
        "greedy",
        "--val-data",
        str(demo / "lmdb/valid"),
        "--device",
        "cpu",
        "--output",
        str(tmp / "out"),
    ]
    with pytest.raises(SolutionError, match="--folds must be at least 2"):
        soup.main([*args, "--folds", "1"])
    with pytest.raises(SolutionError, match=r"--folds 17: need 2 <= K <= 16"):
        soup.main([*args, "--folds", "17"])
    with pytest.raises(SolutionError, match="--folds and --select-split"):
        soup.main([*args, "--folds", "4", "--select-split", "0.5"])
    assert not (tmp / "out").exists()
