"""Model soups (solution.soup) of the shared world's fine-tuned runs: the methods' rules, the weights
they save, scores equal to the submission path's, caching, streaming, refusals and cross-fitting."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import weakref

import numpy as np
import pytest
import torch

from solution import compare, soup
from solution.common import SolutionError, read_jsonl
from solution.data.lmdb_io import LMDBSplit, write_images
from solution.formats.hits import read_hits
from solution.model import ModelConfig, build_model, clean_state_dict, read_checkpoint, save_checkpoint
from solution.retrieval import encode
from solution.retrieval.encode import evaluate_split
from solution.retrieval.metrics import mean_recall
from solution.soups import ingredients, weights
from solution.stats import paired_bootstrap

METHODS = ("uniform", "greedy", "pairwise")


def run(*args) -> dict:
    """``solution.soup`` in this process; a string argument holds words split on spaces (paths are not split)."""
    return soup.main([w for a in args for w in (a.split() if isinstance(a, str) else [str(a)])])


def _sd(path):
    return {k: v.float() for k, v in clean_state_dict(read_checkpoint(path)["state_dict"]).items()}


def _weighted(members, weights_):
    sds = [_sd(p) for p in members]
    return {k: sum(w * sd[k] for w, sd in zip(weights_, sds)) for k in sds[0]}


def _rows(folder):
    return read_jsonl(folder / "soup_log.jsonl")


def _plain(config, members, weights_, lmdb, **kw) -> dict:
    """The candidate's scores through plain validation (its own decoding and encoding)."""
    model = build_model(config)
    model.load_state_dict(_weighted(members, weights_))
    scores = evaluate_split(model.eval(), lmdb, config, **kw)
    return {k: scores[k] for k in ("r1", "r5", "r10", "mean_recall")}


@pytest.fixture(scope="module")
def souped(world, tmp_path_factory):
    """Every checkpoint of both runs, three methods, a selection split and an interpolation with the base."""
    out = tmp_path_factory.mktemp("souped") / "soups"
    globs = [r / "checkpoints" / "*.pt" for r in world.runs]
    summary = run(
        "--checkpoints",
        *globs,
        "--val-data",
        world.lmdb("valid"),
        f"--method {','.join(METHODS)} --select-split 0.5",
        "--seed 3 --interpolate-with",
        world.base,
        "--alphas 0.5,0.9 --device cpu --batch-size 32 --output",
        out,
    )
    return out, summary


@pytest.fixture
def three(world):
    """Three distinct checkpoints of the world's runs."""
    a, b = (r / "checkpoints" for r in world.runs)
    return [a / "epoch_1.pt", a / "epoch_3.pt", b / "epoch_2.pt"]


def test_greedy_keeps_only_strict_gains_from_the_best_single_and_aliases_are_used_once(souped):
    out, summary = souped
    rows = _rows(out / "greedy")
    singles = [r for r in rows if r["method"] == "ingredient"]
    assert len(singles) == 6  # 2 runs x 3 epochs: best.pt and epoch_latest.pt copy an epoch file
    assert sorted(os.path.basename(p) for p in summary["duplicates"]) == ["best.pt"] * 2 + ["epoch_latest.pt"] * 2
    assert all(os.path.basename(kept).startswith("epoch_") for kept in summary["duplicates"].values())
    greedy = [r for r in rows if r["method"] == "greedy"]
    assert len(greedy) == len(singles)  # each ingredient tried once, the best first
    assert greedy[0]["mean_recall"] == max(r["mean_recall"] for r in singles) and greedy[0]["kept"]
    current = greedy[0]["mean_recall"]
    for r in greedy[1:]:
        assert r["kept"] == (r["mean_recall"] > current)
        current = max(current, r["mean_recall"])
    interp = [r for r in rows if r["method"] == "greedy+interpolate"]  # alpha 1 is the soup; a tie keeps it
    assert [r["alpha"] for r in interp] == [1.0, 0.5, 0.9] and interp[0]["mean_recall"] == current
    best = current
    for r in interp[1:]:
        assert r["kept"] == (r["mean_recall"] > best)
        best = max(best, r["mean_recall"])
    assert summary["soups"]["greedy"]["mean_recall"] == best


def test_each_soup_holds_the_average_its_log_names(souped, world):
    out, summary = souped
    for method in METHODS:
        ckpt = read_checkpoint(out / method / "soup.pt")
        recipe = ckpt["recipe"]
        assert recipe["method"] == method and abs(sum(recipe["weights"]) - 1) < 1e-9
        expected = _weighted(recipe["members"], recipe["weights"])
        got = {k: v.float() for k, v in clean_state_dict(ckpt["state_dict"]).items()}
        assert set(got) == set(expected)
        for k in got:
            torch.testing.assert_close(got[k], expected[k], atol=2e-6, rtol=1e-5, msg=f"{method}: {k}")
        kept = [r for r in _rows(out / method) if r["method"].startswith(method) and r["kept"]]
        best = max(kept, key=lambda r: r["mean_recall"])
        assert best["mean_recall"] == recipe["score"]["mean_recall"] == summary["soups"][method]["mean_recall"]
        assert sorted(zip(best["members"], best["weights"])) == sorted(zip(recipe["members"], recipe["weights"]))
        interp = [r for r in _rows(out / method) if r["method"] == f"{method}+interpolate"]
        assert interp[1]["members"][-1] == str(world.base) and interp[1]["weights"][-1] == pytest.approx(0.5)
    greedy = read_checkpoint(out / "greedy" / "soup.pt")["recipe"]
    members = [w for m, w in zip(greedy["members"], greedy["weights"]) if m != str(world.base)]
    assert len(set(members)) == 1  # a running average: uniform over the kept ingredients
    assert (out / "soup.pt").samefile(out / summary["method"] / "soup.pt")
    assert summary["soups"][summary["method"]]["mean_recall"] == max(
        s["mean_recall"] for s in summary["soups"].values()
    )


def test_pairwise_merges_the_two_best_while_the_merge_beats_the_worse(souped):
    out, _ = souped
    rows = _rows(out / "pairwise")
    pool = {r["members"][0]: r["mean_recall"] for r in rows if r["method"] == "ingredient"}
    rounds = [r for r in rows if r["method"] == "pairwise"]
    assert rounds
    for i, r in enumerate(rounds, 1):
        ranked = sorted(pool.values(), reverse=True)
        assert r["round"] == i and sorted(r["pair_scores"], reverse=True) == ranked[:2]
        assert r["kept"] == (r["mean_recall"] > min(r["pair_scores"]))
        if not r["kept"]:
            assert i == len(rounds)  # a merge at or below both members ends the search
            break
        assert (out / "pairwise" / f"merged_round{i}.pt").is_file()
        del pool[r["pair"][1]]
        pool[str(out / "pairwise" / f"merged_round{i}.pt")] = r["mean_recall"]
    assert read_checkpoint(out / "pairwise" / "soup.pt")["recipe"]["score"]["mean_recall"] == max(pool.values())


def test_select_split_reports_the_other_half_and_all_queries(souped):
    out, summary = souped
    sel = summary["selection"]
    assert len(sel["select_text_ids"]) == len(sel["report_text_ids"]) == 8  # half of 16 queries
    assert not set(sel["select_text_ids"]) & set(sel["report_text_ids"])
    for method in METHODS:
        s = summary["soups"][method]
        for k in ("r1", "r5", "r10", "mean_recall"):  # recall is a per-query average
            assert s["all"][k] == pytest.approx((s[k] + s["report"][k]) / 2)
        assert all("report" in r and "all" in r for r in _rows(out / method))


def test_soup_scores_as_plain_cn_clip_and_the_submission_path_score_it(souped, world, tmp_path):
    from cn_clip.clip.model import CLIP

    from solution import evaluate, features, predict

    out, summary = souped
    path = out / "greedy" / "soup.pt"
    ckpt = read_checkpoint(path)
    model = CLIP(**ckpt["config"]["model_info"])  # upstream's loader: strip "module.", strict
    model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}, strict=True)
    sel = set(summary["selection"]["select_text_ids"])
    texts = [r for r in read_jsonl(world.data / "valid_texts.jsonl") if r["text_id"] in sel]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in texts), "utf-8")
    img, txt, pred = tmp_path / "img.npy", tmp_path / "txt.npy", tmp_path / "pred.jsonl"
    features.main(
        f"--extract-image-feats --extract-text-feats --image-data {world.lmdb('valid')} --text-data {tmp_path}/gold.jsonl"
        f" --resume {path} --device cpu --image-feat-output-path {img} --text-feat-output-path {txt} --precision fp32"
        " --no-cache --no-progress".split()
    )
    predict.main(["--image-feats", str(img), "--text-feats", str(txt), "--output", str(pred), "--device", "cpu"])
    result = evaluate.main([str(tmp_path / "gold.jsonl"), str(pred), str(tmp_path / "score.json")])["scoreJson"]
    logged = summary["soups"]["greedy"]
    assert {k: result[k] for k in ("r1", "r5", "r10", "mean_recall")} == pytest.approx(
        {k: logged[k] for k in ("r1", "r5", "r10", "mean_recall")}, abs=1e-9
    )
    ids, feats = encode.encode_images(model, world.lmdb("valid"), ModelConfig.from_dict(ckpt["config"]))
    order, theirs = np.argsort(ids), np.argsort(np.load(tmp_path / "img.ids.npy"))
    np.testing.assert_allclose(feats[order], np.load(img)[theirs], atol=1e-5)


def test_a_rerun_with_the_cache_encodes_nothing_and_the_cache_knows_the_lmdb_by_content(
    souped, world, monkeypatch, tmp_path
):
    out, summary = souped
    moved = tmp_path / "moved"  # the same LMDB elsewhere, another modification time: the same data
    shutil.copytree(world.lmdb("valid"), moved)
    for f in moved.rglob("*.mdb"):
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    for name in ("again", "changed"):
        (tmp_path / name).mkdir()
        shutil.copy(out / "score_cache.json", tmp_path / name)
    calls = []
    real = encode.encode_images
    monkeypatch.setattr(encode, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = ["--checkpoints", *(r / "checkpoints" / "*.pt" for r in world.runs), "--method", "greedy"]
    args += ["--select-split", "0.5", "--seed", "3", "--interpolate-with", world.base, "--alphas", "0.5,0.9"]
    again = run(*args, "--val-data", moved, "--output", tmp_path / "again", "--device", "cpu")
    assert not calls
    assert {k: again["soups"]["greedy"][k] for k in ("members", "mean_recall")} == {
        k: summary["soups"]["greedy"][k] for k in ("members", "mean_recall")
    }
    assert all(r["cached"] for r in _rows(tmp_path / "again"))
    torch.testing.assert_close(_sd(tmp_path / "again" / "soup.pt"), _sd(out / "greedy" / "soup.pt"), atol=0, rtol=0)
    split = LMDBSplit(moved)
    images = [(i, split.image_b64(i)) for i in split.image_ids()]
    split.close()
    write_images(moved, [(i, images[-1][1] if n == 0 else b) for n, (i, b) in enumerate(images)])  # one image changed
    one = ["--checkpoints", world.runs[0] / "checkpoints" / "epoch_1.pt", "--method", "uniform"]
    run(*one, "--val-data", moved, "--output", tmp_path / "changed", "--device", "cpu")
    assert calls  # scored again


def test_soup_resumes_in_train(souped, world, tmp_path):
    from solution.training import trainer

    result = trainer.main(
        f"--train-data {world.lmdb('train')} --resume {souped[0] / 'greedy' / 'soup.pt'} --logs {tmp_path}"
        " --name from_soup --batch-size 24 --max-steps 1 --device cpu --num-workers 0 --no-plot --no-progress"
        " --precision fp32 --warmup 1".split()
    )
    assert read_checkpoint(result["last_checkpoint"])["config"]["vision_model"] == "ViT-Tiny"


def test_hits_of_every_candidate_and_the_significance_compare_shows(souped, world):
    """Each scored candidate's hits over all queries give its mean recall digit for digit; each summary
    holds the paired bootstrap against the best single ingredient; compare shows the same numbers."""
    out, summary = souped
    ref = summary["best_single"]
    ref_ids, ref_hits = read_hits(out / ref["hits"])
    assert ref_hits.shape == (16, 3) and mean_recall(ref_hits) == ref["all"]["mean_recall"]
    sig = summary["significance"]
    assert sig["reference"] == ref["path"] and sig["n_resamples"] == 1000 and set(sig["soups"]) == set(METHODS)
    for m in METHODS:
        s = summary["soups"][m]
        ids, hits = read_hits(out / s["hits"])
        assert ids.tolist() == ref_ids.tolist() and mean_recall(hits) == s["all"]["mean_recall"]
        b = paired_bootstrap(hits, ref_hits, n_resamples=1000, seed=0)
        assert sig["soups"][m] == {"diff": b.diff, "low": b.low, "high": b.high, "significant": b.significant}
        assert json.loads((out / m / "summary.json").read_text())["significance"]["soups"][m] == sig["soups"][m]
        assert all((out / r["hits"]).is_file() for r in _rows(out / m))
    text = compare.main([str(out), "--no-plot", "--csv"])
    rows = {r["name"].split("/")[-1]: r for r in csv.DictReader(io.StringIO(text))}
    for m in METHODS:
        s, row = summary["soups"][m], rows[m]
        assert float(row["mean_recall"]) == pytest.approx(s["all"]["mean_recall"])
        assert (float(row["select_mr"]), float(row["held_out_mr"])) == pytest.approx(
            (s["mean_recall"], s["report"]["mean_recall"])
        )
        assert float(row["vs_ref"]) == pytest.approx(sig["soups"][m]["diff"])
        assert float(row["ci_low"]) == pytest.approx(sig["soups"][m]["low"])
        assert row["note"].startswith("vs best ingredient ") and os.path.basename(ref["path"]) in row["note"]


def test_streamed_one_checkpoint_at_a_time(three, monkeypatch, tmp_path):
    alive = []
    real = ingredients.read_checkpoint

    def tracking(path, **kw):
        ckpt = real(path, **kw)
        alive[:] = [r for r in alive if r() is not None]
        assert not alive, "a second checkpoint was read while another was still held"
        alive.append(weakref.ref(ckpt["state_dict"]["module.logit_scale"]))
        return ckpt

    monkeypatch.setattr(ingredients, "read_checkpoint", tracking)  # inspecting
    monkeypatch.setattr(weights, "read_checkpoint", tracking)  # averaging
    summary = run("--checkpoints", *three, "--method", "uniform", "--no-score", "--output", tmp_path / "out")
    expected = _weighted(three, [1 / 3] * 3)
    for k, v in _sd(tmp_path / "out" / "soup.pt").items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-6)
    assert summary["soups"]["uniform"]["weights"] == pytest.approx([1 / 3] * 3) and not summary["duplicates"]


def test_identical_files_are_used_once_the_epoch_file_kept(three, tmp_path):
    ckpt = read_checkpoint(three[0])
    (tmp_path / "r").mkdir()
    torch.save({**ckpt, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "r" / "epoch_latest.pt")
    shutil.copy(three[0], tmp_path / "r" / "epoch_1.pt")
    summary = run(
        "--checkpoints", tmp_path / "r" / "*.pt", three[1], "--method uniform --no-score --output", tmp_path / "out"
    )
    assert summary["duplicates"] == {str(tmp_path / "r" / "epoch_latest.pt"): str(tmp_path / "r" / "epoch_1.pt")}
    assert summary["soups"]["uniform"]["members"] == [str(tmp_path / "r" / "epoch_1.pt"), str(three[1])]


@pytest.mark.parametrize("what", ["context_length", "text_prompt", "architecture"])
def test_mismatched_ingredients_are_refused_before_any_work(three, world, what, monkeypatch, tmp_path):
    odd = tmp_path / "odd.pt"
    if what == "architecture":
        info = dict(world.config.model_info)
        keys = ("embed_dim", "image_resolution", "vision_width", "vision_patch_size", "vision_head_width")
        (tmp_path / "ViT-Tiny1.json").write_text(json.dumps({**{k: info[k] for k in keys}, "vision_layers": 1}))
        monkeypatch.setattr("solution.model.registry.EXTRA_CONFIG_DIRS", (tmp_path,))
        other = ModelConfig("ViT-Tiny1", "RBT-Tiny", context_length=32)
        save_checkpoint(odd, build_model(other).state_dict(), other)
    else:
        kw = {"context_length": 24} if what == "context_length" else {"context_length": 32, "text_prompt": "图："}
        save_checkpoint(odd, read_checkpoint(three[1])["state_dict"], ModelConfig("ViT-Tiny", "RBT-Tiny", **kw))
    with pytest.raises(SolutionError) as e:
        run("--checkpoints", *three, odd, "--method", "uniform", "--output", tmp_path / "out", "--no-score")
    assert "odd.pt" in str(e.value) and ("ViT-Tiny1" if what == "architecture" else what) in str(e.value)
    assert not (tmp_path / "out").exists()


def _bad_files(three, world, tmp_path) -> None:
    (tmp_path / "truncated.pt").write_bytes(three[0].read_bytes()[:5000])
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    sd = dict(read_checkpoint(three[0])["state_dict"])
    sd["module.visual.transformer.resblocks.0.attn.lora_A.default.weight"] = torch.zeros(4, 64)
    save_checkpoint(tmp_path / "lora.pt", sd, world.config)
    shutil.copytree(world.lmdb("valid") / "imgs", tmp_path / "imgonly" / "imgs")


def test_bad_inputs_are_one_clear_error_before_any_work(three, world, tmp_path):
    _bad_files(three, world, tmp_path)
    out = ["--output", tmp_path / "out"]
    plain, scored = ["--method", "uniform", "--no-score", *out], ["--method", "greedy", *out]
    valid, imgonly, test_texts = world.lmdb("valid"), tmp_path / "imgonly", world.data / "test_texts.jsonl"
    cases = [
        ([tmp_path / "nothing" / "*.pt", *plain], "no checkpoint matches"),
        ([three[0], tmp_path / "truncated.pt", *plain], "truncated.pt is not a readable checkpoint"),
        ([tmp_path / "notes.pt", *plain], "notes.pt"),
        ([tmp_path / "other.pt", *plain], "other.pt has no 'state_dict'"),
        ([tmp_path / "lora.pt", *plain], "unmerged LoRA"),
        ([three[0], *scored, "--val-data", imgonly], "has no texts"),
        ([three[0], *scored, "--val-data", imgonly, "--val-texts", test_texts], "no gold image_ids"),
        ([three[0], *scored], "--val-data is required"),
        ([three[0], *scored, "--val-data", valid, "--folds", "1"], "--folds must be at least 2"),
        ([three[0], *scored, "--val-data", valid, "--folds", "17"], r"--folds 17: need 2 <= K <= 16"),
        ([three[0], *scored, "--val-data", valid, "--folds", "4", "--select-split", "0.5"], "--folds and --select"),
        ([three[0], "--method", "greedy,stew", *out], "unknown --method 'stew'"),
    ]
    for args, message in cases:
        with pytest.raises(SolutionError, match=message):
            run("--checkpoints", *args)
    assert not (tmp_path / "out").exists()


def test_val_texts_give_the_scores_of_the_lmdb_pairs(three, world, tmp_path):
    shutil.copytree(world.lmdb("valid") / "imgs", tmp_path / "imgonly" / "imgs")
    args = ["--checkpoints", three[0], "--method", "greedy", "--device", "cpu"]
    a = run(*args, "--val-data", world.lmdb("valid"), "--output", tmp_path / "a")
    b = run(
        *args,
        "--val-data",
        tmp_path / "imgonly",
        "--val-texts",
        world.data / "valid_texts.jsonl",
        "--output",
        tmp_path / "b",
    )
    assert a["best_single"]["mean_recall"] == b["best_single"]["mean_recall"]
    assert a["best_single"]["r10"] == b["best_single"]["r10"]


def test_gallery_decoded_and_queries_tokenised_once_with_plain_validation_s_scores(three, world, monkeypatch, tmp_path):
    from solution.data import datasets

    decoded, tokenised = [], []
    real_decode, real_tokenize = datasets.decode_image, encode.tokenize
    monkeypatch.setattr(datasets, "decode_image", lambda b64: decoded.append(1) or real_decode(b64))
    monkeypatch.setattr(encode, "tokenize", lambda *a, **k: tokenised.append(1) or real_tokenize(*a, **k))
    run(
        "--checkpoints",
        *three,
        "--method uniform --device cpu --batch-size 16 --val-data",
        world.lmdb("valid"),
        "--output",
        tmp_path / "out",
    )
    rows = _rows(tmp_path / "out")
    assert len(rows) == 4  # three ingredients and the soup
    split = LMDBSplit(world.lmdb("valid"))
    assert len(decoded) == split.num_images
    assert len(tokenised) == len(encode.text_batches(encode.split_queries(split).texts, world.config, 16))
    monkeypatch.undo()
    for row in rows:
        plain = _plain(world.config, row["members"], row["weights"], world.lmdb("valid"), batch_size=16)
        assert {k: row[k] for k in plain} == plain, row["members"]


def test_fp16_ingredients_give_an_fp16_soup_scored_as_saved(three, world, tmp_path):
    halves = []
    for i, p in enumerate(three):
        sd = {k: v.half() for k, v in read_checkpoint(p)["state_dict"].items()}
        halves.append(save_checkpoint(tmp_path / f"half/h{i}.pt", sd, world.config))
    summary = run(
        "--checkpoints",
        tmp_path / "half/*.pt",
        "--method uniform --device cpu --val-data",
        world.lmdb("valid"),
        "--output",
        tmp_path / "out",
    )
    ckpt = read_checkpoint(tmp_path / "out" / "soup.pt")
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float16}
    expected = _weighted(halves, [1 / 3] * 3)
    for k, v in clean_state_dict(ckpt["state_dict"]).items():
        torch.testing.assert_close(v.float(), expected[k], atol=1e-3, rtol=1e-3)
    from solution.model import load_model

    model, cfg, _ = load_model(tmp_path / "out" / "soup.pt")
    assert evaluate_split(model, world.lmdb("valid"), cfg)["mean_recall"] == summary["soups"]["uniform"]["mean_recall"]


def test_from_study_takes_the_top_complete_trials_the_best_can_be_souped_with(three, world, tmp_path, caplog):
    study = tmp_path / "study"
    prompt = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32, text_prompt="图片：")
    rows = [(0, "COMPLETE", 30.0), (1, "PRUNED", 99.0), (2, "COMPLETE", 50.0), (3, "COMPLETE", 45.0)]
    rows += [(4, "COMPLETE", 40.0), (5, "FAIL", "")]
    for n, _, _ in rows:
        sd = read_checkpoint(three[n % 3])["state_dict"]
        save_checkpoint(
            study / "trials" / f"{n:04d}" / "checkpoints" / "best.pt", sd, prompt if n == 3 else world.config
        )
    (study / "trials.csv").write_text(
        "number,state,value,run_dir,params_lr\n" + "".join(f"{n},{s},{v},,0.1\n" for n, s, v in rows)
    )
    assert [p.parent.parent.name for p in ingredients.study_checkpoints(study, 2)] == ["0002", "0004"]
    assert "passing over trial 3" in caplog.text  # another prompt than the best trial's
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "trials.csv").write_text("number,state,value,run_dir\n0,FAIL,,x\n")
    with pytest.raises(SolutionError, match="no complete trial"):
        ingredients.study_checkpoints(tmp_path / "empty", 2)


def test_folds_cross_fit_each_query_once_from_stored_hits_and_ship_the_refit(three, world, monkeypatch, tmp_path):
    args = ["--checkpoints", *three, "--method", ",".join(METHODS), "--val-data", world.lmdb("valid")]
    args += ["--device", "cpu", "--seed", "5"]
    calls = []
    real = encode.score_parts
    monkeypatch.setattr("solution.soups.scoring.score_parts", lambda *a, **k: calls.append(1) or real(*a, **k))
    crossed = run(*args, "--folds", "4", "--output", tmp_path / "cf")
    n_encoded = len(calls)
    plain = run(*args, "--output", tmp_path / "plain")
    all_ids = sorted(r["text_id"] for r in read_jsonl(world.data / "valid_texts.jsonl"))
    for m in METHODS:
        cf = crossed["soups"][m]["crossfit"]
        assert cf["k"] == 4 and sorted(t for f in cf["folds"] for t in f) == all_ids  # each query held out once
        again = [
            _plain(world.config, fm["members"], fm["weights"], world.lmdb("valid"), text_ids=fold)["mean_recall"]
            for fm, fold in zip(cf["fold_members"], cf["folds"])
        ]
        assert cf["fold_scores"] == pytest.approx(again, abs=1e-9) and cf["mean"] == pytest.approx(sum(again) / 4)
        assert cf["low"] <= cf["mean"] <= cf["high"]
        mine, theirs = crossed["soups"][m], plain["soups"][m]  # the refit: the soup chosen without --folds
        assert {k: mine[k] for k in ("members", "weights", "mean_recall")} == {
            k: theirs[k] for k in ("members", "weights", "mean_recall")
        }
        torch.testing.assert_close(
            _sd(tmp_path / "cf" / m / "soup.pt"), _sd(tmp_path / "plain" / m / "soup.pt"), atol=0, rtol=0
        )
        assert "crossfit" not in theirs and (tmp_path / "cf" / m / "crossfit" / "fold4" / "soup_log.jsonl").is_file()
    from solution.report.folders import read_soup  # compare's held-out column: the cross-fit mean

    [entry] = read_soup(tmp_path / "cf" / "greedy", "cf")
    cf = crossed["soups"]["greedy"]["crossfit"]
    assert (entry.held_out, entry.extra["crossfit"]["low"]) == (cf["mean"], cf["low"])
    assert read_soup(tmp_path / "plain" / "greedy", "plain")[0].held_out is None
    cache = json.loads((tmp_path / "cf" / "score_cache.json").read_text())  # one entry per candidate encoded
    assert n_encoded == len(cache["scores"])  # none twice, whatever the folds
    calls.clear()
    (tmp_path / "cf2").mkdir()  # a rerun with the cache and its hits files encodes nothing
    shutil.copy(tmp_path / "cf" / "score_cache.json", tmp_path / "cf2")
    shutil.copytree(tmp_path / "cf" / "hits", tmp_path / "cf2" / "hits")
    rerun = run(*args, "--folds", "4", "--output", tmp_path / "cf2")
    assert not calls and rerun["soups"]["greedy"]["crossfit"] == crossed["soups"]["greedy"]["crossfit"]
