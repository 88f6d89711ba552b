"""Model soups (solution.soup) of the world's runs: methods, weights, scores, caching, refusals, cross-fitting."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from cli_helpers import snapshot

from solution import compare, soup
from solution.common import SolutionError, read_jsonl
from solution.data.lmdb_io import LMDBSplit, write_images
from solution.formats.hits import read_hits
from solution.model import ModelConfig, build_model, clean_state_dict, fingerprint, read_checkpoint, save_checkpoint
from solution.report.folders import read_soup
from solution.retrieval import encode
from solution.retrieval.encode import evaluate_split
from solution.retrieval.metrics import RECALL_KEYS, mean_recall
from solution.soups import ingredients, methods
from solution.soups.scoring import Scorer
from solution.stats import id_folds, paired_bootstrap

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


@pytest.fixture(scope="module")
def souped(world, tmp_path_factory):
    """Every checkpoint of both runs, four methods, a selection split and an interpolation with the base."""
    args = ["--checkpoints", *(r / "checkpoints" / "*.pt" for r in world.runs), "--val-data", world.lmdb("valid")]
    args += [f"--method {','.join(METHODS)},model_stock --select-split 0.5 --seed 3 --interpolate-with", world.base]
    args += ["--alphas 0.5,0.9 --device cpu --batch-size 32"]
    out = tmp_path_factory.mktemp("souped") / "soups"
    return out, run(*args, "--output", out), args


@pytest.fixture
def three(world):
    a, b = (r / "checkpoints" for r in world.runs)
    return [a / "epoch_1.pt", a / "epoch_3.pt", b / "epoch_2.pt"]


def test_greedy_keeps_only_strict_gains_pairwise_merges_the_best_two_while_it_gains_aliases_used_once(souped):
    out, summary, _ = souped
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
        assert r["kept"] == (r["mean_recall"] > current) and r["label"] == f"+ {os.path.basename(r['members'][-1])}"
        current = max(current, r["mean_recall"])
    interp = [r for r in rows if r["method"] == "greedy+interpolate"]  # alpha 1 is the soup; a tie keeps it
    assert [r["alpha"] for r in interp] == [1.0, 0.5, 0.9] and interp[0]["mean_recall"] == current
    for r in interp[1:]:
        assert r["kept"] == (r["mean_recall"] > current)
        current = max(current, r["mean_recall"])
    assert summary["soups"]["greedy"]["mean_recall"] == current
    rows = _rows(out / "pairwise")  # pairwise: the two best merged while the merge beats the worse
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
        assert (out / "pairwise" / f"merged_round{i}.pt").is_file()  # named in the log relative to its folder
        del pool[r["pair"][1]]
        pool[f"merged_round{i}.pt"] = r["mean_recall"]
    assert read_checkpoint(out / "pairwise" / "soup.pt")["recipe"]["score"]["mean_recall"] == max(pool.values())


def test_each_soup_holds_the_average_its_log_names(souped, world):
    out, summary, _ = souped
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
        s = summary["soups"][method]  # --select-split: the other half reported, and all queries (recall: a mean)
        assert [s["all"][k] for k in s["report"]] == pytest.approx([(s[k] + s["report"][k]) / 2 for k in s["report"]])
        assert all("report" in r and "all" in r for r in _rows(out / method))
    greedy = read_checkpoint(out / "greedy" / "soup.pt")["recipe"]
    members = [w for m, w in zip(greedy["members"], greedy["weights"]) if m != str(world.base)]
    assert len(set(members)) == 1  # a running average: uniform over the kept ingredients
    sel = summary["selection"]  # disjoint halves of the 16 queries
    assert len({*sel["select_text_ids"], *sel["report_text_ids"]}) == 2 * len(sel["report_text_ids"]) == 16
    assert (out / "soup.pt").samefile(out / summary["method"] / "soup.pt")
    scores = {m: s["mean_recall"] for m, s in summary["soups"].items()}
    assert scores[summary["method"]] == max(scores.values())


def test_model_stock_interpolates_each_tensor_with_the_start_by_the_fine_tunes_angle(world, tmp_path):
    """Per tensor, deltas from the start (exact in fp32) at a known angle: t = 2 cos / (1 + cos) of the average
    (cos 1/2: 2/3; cos 0 and no delta: the start; cos 1: the average); the oracle in float64."""
    cases = [([1, 1, 0], [1, 0, 1], 2 / 3), ([1, 0, 0], [0, 1, 0], 0), ([1, 0, 0], [1, 0, 0], 1), ([0] * 3, [0] * 3, 0)]
    start, tunes, want = {k: v.double() for k, v in _sd(world.base).items()}, ({}, {}), {}
    for i, (k, v) in enumerate(sorted(start.items())):
        v.view(-1)[:3] = 0
        *deltas, t = cases[i % 4] if v.numel() >= 3 else cases[3]  # a known angle needs 3 elements
        for tune, d in zip(tunes, deltas):
            tune[k] = v.clone()
            tune[k].view(-1)[:3] = (torch.tensor(d, dtype=torch.float64) / 16)[: v.numel()]
        want[k] = v + t * ((tunes[0][k] + tunes[1][k]) / 2 - v)
    sds = [{k: x.float() for k, x in sd.items()} for sd in (start, *tunes)]
    paths = [save_checkpoint(tmp_path / f"{n}.pt", sd, world.config) for n, sd in enumerate(sds)]
    argv = ["--checkpoints", *paths[1:], "--method model_stock --no-score --interpolate-with", paths[0]]
    ratio = run(*argv, "--output", tmp_path / "out")["soups"]["model_stock"]["ratio"]
    got = _sd(tmp_path / "out" / "soup.pt")
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, atol=1e-6, rtol=0, msg=k)
    assert (ratio["min"], ratio["max"]) == (0.0, 1.0)


def test_soup_scores_as_plain_cn_clip_and_the_submission_path_score_it(souped, world, tmp_path):
    from cn_clip.clip.model import CLIP

    from solution import evaluate, features, predict

    out, summary, _ = souped
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
    assert [result[k] for k in RECALL_KEYS] == pytest.approx([logged[k] for k in RECALL_KEYS], abs=1e-9)


def test_rerun_encodes_nothing_lmdb_and_checkpoints_known_by_content(souped, world, three, monkeypatch, tmp_path):
    out, summary, args = souped
    moved = tmp_path / "moved"  # the same LMDB elsewhere, another modification time: the same data
    shutil.copytree(world.lmdb("valid"), moved)
    for f in moved.rglob("*.mdb"):
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    shutil.copytree(out, tmp_path / "again")
    calls = []
    real = encode.encode_images
    monkeypatch.setattr(encode, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = [moved if a == world.lmdb("valid") else a for a in args]
    again = run(*args, "--method greedy --output", tmp_path / "again")
    assert not calls and all(r["cached"] for r in _rows(tmp_path / "again"))
    assert again["soups"]["greedy"]["mean_recall"] == summary["soups"]["greedy"]["mean_recall"]
    torch.testing.assert_close(_sd(tmp_path / "again" / "soup.pt"), _sd(out / "greedy" / "soup.pt"), atol=0, rtol=0)
    split = LMDBSplit(moved)
    images = [(i, split.image_b64(i)) for i in split.image_ids()]
    split.close()
    write_images(moved, [(i, images[-1][1] if n == 0 else b) for n, (i, b) in enumerate(images)])  # one image changed
    one = ["--checkpoints", three[0], "--method", "uniform", "--device", "cpu", "--output", tmp_path / "again"]
    run(*one, "--val-data", moved)
    assert calls  # scored again
    ckpt = tmp_path / "x.pt"  # another checkpoint over an ingredient, same size and modification time
    for src in (three[1], three[2]):
        save_checkpoint(ckpt, read_checkpoint(src)["state_dict"], world.config)
        os.utime(ckpt, ns=(1_000_000_000, 1_000_000_000))
        got = run(*one[:2], ckpt, *one[2:], "--val-data", world.lmdb("valid"))
    fresh = run(*one[:2], ckpt, *one[2:-1], tmp_path / "fresh", "--val-data", world.lmdb("valid"))
    assert got["soups"]["uniform"]["mean_recall"] == fresh["soups"]["uniform"]["mean_recall"]
    assert _rows(tmp_path / "again")[1]["fingerprint"] == fingerprint(ckpt) != fingerprint(three[1])


def test_hits_of_every_candidate_and_the_paired_bootstrap_compare_shows(souped):
    """Each candidate's hits give its mean recall digit for digit; compare shows their paired bootstrap."""
    out, summary, _ = souped
    ref = summary["best_single"]
    ref_ids, ref_hits = read_hits(out / ref["hits"])
    assert ref_hits.shape == (16, 3) and mean_recall(ref_hits) == ref["all"]["mean_recall"]
    text = compare.main([str(out), "--no-plot", "--csv"])
    rows = {r["name"].split("/")[-1]: r for r in csv.DictReader(io.StringIO(text))}
    for m in METHODS:
        s, row = summary["soups"][m], rows[m]
        ids, hits = read_hits(out / s["hits"])
        assert ids.tolist() == ref_ids.tolist() and mean_recall(hits) == s["all"]["mean_recall"]
        assert all((out / r["hits"]).is_file() for r in _rows(out / m))
        b = paired_bootstrap(hits, ref_hits, n_resamples=1000, seed=0)
        got = [float(row[c]) for c in ("mean_recall", "select_mr", "held_out_mr", "vs_ref", "ci_low")]
        want = [s["all"]["mean_recall"], s["mean_recall"], s["report"]["mean_recall"], b.diff, b.low]
        assert got == pytest.approx(want)
        assert row["note"].startswith("vs best ingredient ") and os.path.basename(ref["path"]) in row["note"]


def test_fp16_soup_streamed_one_at_a_time_duplicates_used_once_scored_as_saved(three, world, monkeypatch, tmp_path):
    alive = []
    real = ingredients.read_checkpoint

    def tracking(path, **kw):
        ckpt = real(path, **kw)
        alive[:] = [r for r in alive if r() is not None]
        assert not alive, "a second checkpoint was read while another was still held"
        alive.append(weakref.ref(ckpt["state_dict"]["module.logit_scale"]))
        return ckpt

    r = tmp_path / "r"
    members = [r / f"epoch_{i}.pt" for i in (1, 2, 3)]
    for src, dst in zip(three, members):
        save_checkpoint(dst, {k: v.half() for k, v in real(src)["state_dict"].items()}, world.config)
    torch.save({**real(members[0]), "optimizer": {"state": {}, "param_groups": []}}, r / "epoch_latest.pt")
    monkeypatch.setattr(ingredients, "read_checkpoint", tracking)  # inspecting
    monkeypatch.setattr(methods, "read_checkpoint", tracking)  # averaging
    args = ["--checkpoints", r / "*.pt", "--method uniform --device cpu --val-data", world.lmdb("valid")]
    summary = run(*args, "--output", tmp_path / "out")
    assert summary["duplicates"] == {str(r / "epoch_latest.pt"): str(members[0])}
    assert summary["soups"]["uniform"]["members"] == list(map(str, members))
    ckpt = read_checkpoint(tmp_path / "out" / "soup.pt")
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float16}
    expected = _weighted(members, [1 / 3] * 3)
    for k, v in clean_state_dict(ckpt["state_dict"]).items():
        torch.testing.assert_close(v.float(), expected[k], atol=1e-3, rtol=1e-3)
    from solution.model import load_model

    model, cfg, _ = load_model(tmp_path / "out" / "soup.pt")
    assert evaluate_split(model, world.lmdb("valid"), cfg)["mean_recall"] == summary["soups"]["uniform"]["mean_recall"]


def test_bad_inputs_are_one_clear_error_before_any_work(three, world, tmp_path, monkeypatch):
    info = dict(world.config.model_info)  # ingredients of another architecture, context length and prompt
    keys = ("embed_dim", "image_resolution", "vision_width", "vision_patch_size", "vision_head_width")
    (tmp_path / "ViT-Tiny1.json").write_text(json.dumps({**{k: info[k] for k in keys}, "vision_layers": 1}))
    monkeypatch.setattr("solution.model.registry.EXTRA_CONFIG_DIRS", (tmp_path,))
    other = ModelConfig("ViT-Tiny1", "RBT-Tiny", context_length=32)
    save_checkpoint(tmp_path / "arch.pt", build_model(other).state_dict(), other)
    for name, kw in (("ctx", {"context_length": 24}), ("prompt", {"context_length": 32, "text_prompt": "图："})):
        save_checkpoint(tmp_path / f"{name}.pt", _sd(three[1]), ModelConfig("ViT-Tiny", "RBT-Tiny", **kw))
    (tmp_path / "truncated.pt").write_bytes(three[0].read_bytes()[:5000])
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    sd = dict(read_checkpoint(three[0])["state_dict"])
    sd["module.visual.transformer.resblocks.0.attn.lora_A.default.weight"] = torch.zeros(4, 64)
    save_checkpoint(tmp_path / "lora.pt", sd, world.config)
    shutil.copytree(world.lmdb("valid") / "imgs", tmp_path / "imgonly" / "imgs")
    out = ["--output", tmp_path / "out"]
    plain, scored = ["--method", "uniform", "--no-score", *out], ["--method", "greedy", *out]
    valid, imgonly, test_texts = world.lmdb("valid"), tmp_path / "imgonly", world.data / "test_texts.jsonl"
    cases = [
        ([*three, tmp_path / "ctx.pt", *plain], "ctx.pt.*context_length"),
        ([*three, tmp_path / "prompt.pt", *plain], "prompt.pt.*text_prompt"),
        ([*three, tmp_path / "arch.pt", *plain], "arch.pt.*ViT-Tiny1"),
        ([tmp_path / "nothing" / "*.pt", *plain], "no checkpoint matches"),
        ([three[0], tmp_path / "truncated.pt", *plain], "truncated.pt is not a readable checkpoint"),
        ([tmp_path / "notes.pt", *plain], "notes.pt"),
        ([tmp_path / "other.pt", *plain], "other.pt has no 'state_dict'"),
        ([tmp_path / "lora.pt", *plain], "unmerged LoRA"),
        ([three[0], *scored, "--val-data", imgonly], "has no texts"),
        ([three[0], *scored, "--val-data", imgonly, "--val-texts", test_texts], "no gold image_ids"),
        ([three[0], *scored], "--val-data is required"),
        ([three[0], *scored, "--val-data", valid, "--folds", "1"], "--folds 1: at least 2"),
        ([three[0], *scored, "--val-data", valid, "--folds", "17"], r"--folds 17: need 2 <= K <= 16"),
        ([three[0], *scored, "--val-data", valid, "--folds", "4", "--select-split", "0.5"], "no --select-split"),
        ([three[0], *scored, "--val-data", valid, "--select-split", "0"], r"--select-split must be a fraction in \(0"),
        ([three[0], "--method", "greedy,stew", *out], "unknown --method 'stew'"),
        ([three[0], *plain, "--from-study", tmp_path, "--top", "0"], "--top must be at least 1"),
        ([three[0], *plain, "--from-study", tmp_path, "--top", "-1"], "--top must be at least 1"),
        ([three[0], *plain, "--alphas", "0.5"], "--alphas needs --interpolate-with"),
        ([three[0], "--method greedy --no-score", *out], "--no-score: only uniform and model_stock"),
        ([*three[:2], "--method model_stock --no-score", *out], "model_stock needs the fine-tunes' start"),
        ([three[0], world.base, "--method model_stock --no-score --interpolate-with", world.base, *out], "at least 2"),
    ]
    for args, message in cases:
        with pytest.raises(SolutionError, match=message):
            run("--checkpoints", *args)
    assert not (tmp_path / "out").exists()


def test_gallery_decoded_queries_tokenised_once_scores_as_plain_validation(three, world, monkeypatch, tmp_path):
    from solution.data import datasets

    decoded, tokenised = [], []
    real_decode, real_tokenize = datasets.decode_image, encode.tokenize
    monkeypatch.setattr(datasets, "decode_image", lambda b64: decoded.append(1) or real_decode(b64))
    monkeypatch.setattr(encode, "tokenize", lambda *a, **k: tokenised.append(1) or real_tokenize(*a, **k))
    args = ["--checkpoints", *three, "--method uniform --device cpu --batch-size 16 --val-data", world.lmdb("valid")]
    run(*args, "--output", tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert len(rows) == 4  # three ingredients and the soup
    split = LMDBSplit(world.lmdb("valid"))
    assert len(decoded) == split.num_images
    assert len(tokenised) == len(encode.text_batches(encode.split_queries(split).texts, world.config, 16))
    monkeypatch.undo()
    for row in rows:  # each candidate through plain validation (its own decoding and encoding)
        model = build_model(world.config)
        model.load_state_dict(_weighted(row["members"], row["weights"]))
        plain = evaluate_split(model.eval(), world.lmdb("valid"), world.config, batch_size=16)
        assert [row[k] for k in RECALL_KEYS] == [plain[k] for k in RECALL_KEYS], row["members"]
    shutil.copytree(world.lmdb("valid") / "imgs", tmp_path / "imgonly" / "imgs")  # no pairs: the queries from a file
    run(*args[:-1], tmp_path / "imgonly", "--val-texts", world.data / "valid_texts.jsonl", "--output", tmp_path / "vt")
    assert [r["mean_recall"] for r in _rows(tmp_path / "vt")] == [r["mean_recall"] for r in rows]


def test_from_study_takes_the_top_complete_trials_the_best_can_be_souped_with(three, world, tmp_path, caplog):
    study = tmp_path / "study"
    prompt = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32, text_prompt="图片：")
    rows = [(0, "COMPLETE", 30.0), (1, "PRUNED", 99.0), (2, "COMPLETE", 50.0), (3, "COMPLETE", 45.0)]
    rows += [(4, "COMPLETE", 40.0), (5, "FAIL", "")]
    for n, _, _ in rows:
        sd = read_checkpoint(three[n % 3])["state_dict"]
        save_checkpoint(study / f"trials/{n:04d}/checkpoints/best.pt", sd, prompt if n == 3 else world.config)
    table = "".join(f"{n},{s},{v},,0.1\n" for n, s, v in rows)
    (study / "trials.csv").write_text("number,state,value,run_dir,params_lr\n" + table)
    assert [p.parent.parent.name for p in ingredients.study_checkpoints(study, 2)] == ["0002", "0004"]
    assert "passing over trial 3" in caplog.text  # another prompt than the best trial's
    bad = {"0,FAIL,,x\n": "no complete trial", "0,COMPLETE,high,x\n": "number and value must be numbers"}
    bad['0,COMPLETE,"35.0,x\n1,COMPLETE,30,y\n'] = "trials.csv:2: malformed CSV"
    for table, message in bad.items():
        (study / "trials.csv").write_text("number,state,value,run_dir\n" + table)
        with pytest.raises(SolutionError, match=message):
            ingredients.study_checkpoints(study, 2)


@pytest.mark.parametrize(
    "files, output, refused",  # files in folder f ("x/": a folder; "*.pt": a copy of an ingredient, given as one)
    [
        (["params.json", "metrics.jsonl"], "", "is a run folder"),
        (["ensemble.json"], "", "is a ensemble folder"),
        (["trials.csv"], "", "is a study folder"),
        (["imgs/data.mdb"], "soup", "lies inside .*, an lmdb folder"),
        (["valid_texts.jsonl"], "soup", "lies inside .*, a data folder"),
        (["notes.txt"], "", "holds files but no soup"),
        (["soup.pt/"], "", "holds files but no soup"),
        (["notes.txt"], "notes.txt", "is a file, expected a folder"),
        (["notes.txt"], "notes.txt/soup", "sits under .*, which is a file"),
        (["soup.pt"], "", "soup.pt is one of the inputs"),
    ],
)
def test_an_output_that_cannot_be_a_soup_folder_is_refused_writing_nothing(three, tmp_path, files, output, refused):
    for name in files:
        (tmp_path / "f" / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            (tmp_path / "f" / name).mkdir()
        elif name.endswith(".pt"):
            shutil.copy(three[2], tmp_path / "f" / name)
        else:
            (tmp_path / "f" / name).write_text("x")
    given = [tmp_path / "f" / n for n in files if n.endswith(".pt")]
    before = {p: p.is_file() and p.read_bytes() for p in tmp_path.rglob("*")}
    with pytest.raises(SolutionError, match=refused):
        run("--checkpoints", *three[:2], *given, "--method uniform --no-score --output", tmp_path / "f" / output)
    assert {p: p.is_file() and p.read_bytes() for p in tmp_path.rglob("*")} == before


def test_a_second_soup_into_the_same_output_is_refused_naming_the_first(three, tmp_path, monkeypatch):
    argv = ["--checkpoints", *three[:2], "--method uniform --no-score --output", tmp_path / "s"]
    real, refused = methods.uniform, []

    def uniform(*a):  # while the first run writes
        with pytest.raises(SolutionError, match=f"--output {tmp_path / 's'} is in use by pid {os.getpid()}"):
            run(*argv)
        refused.append(1)
        return real(*a)

    monkeypatch.setattr(methods, "uniform", uniform)
    assert run(*argv)["soups"]["uniform"] and refused
    with pytest.raises(SolutionError, match="every checkpoint matched lies inside the output folder"):
        run("--checkpoints", tmp_path / "s" / "*.pt", *argv[3:])


def test_a_kill_leaves_the_previous_folder_whole_and_damaged_hits_are_scored_again(souped, tmp_path, caplog):
    """kill -9 in the pairwise stage of a re-run: not a byte of the earlier soup changes; the next run ends it."""
    out, _, args = souped
    shutil.copytree(out, tmp_path / "soups")
    before = snapshot(tmp_path / "soups")
    code = "import os, sys; from solution.soups import methods; methods.pairwise = lambda *a: os.kill(os.getpid(), 9)"
    code += "; from solution import soup; soup.main(sys.argv[1:])"
    argv = [w for a in [*args, "--output", tmp_path / "soups"] for w in (a.split() if isinstance(a, str) else [str(a)])]
    assert subprocess.run([sys.executable, "-c", code, *argv], capture_output=True).returncode == -9
    assert snapshot(tmp_path / "soups") == before
    assert (tmp_path / ".soups.building" / "greedy" / "soup.pt").is_file()  # built, never swapped in
    damaged = tmp_path / "soups" / json.loads((tmp_path / "soups" / "summary.json").read_text())["best_single"]["hits"]
    damaged.write_bytes(damaged.read_bytes()[:50])
    summary = run(*args, "--output", tmp_path / "soups")
    assert "scoring it again" in caplog.text and not (tmp_path / ".soups.building").exists()
    assert mean_recall(read_hits(damaged)[1]) == summary["best_single"]["all"]["mean_recall"]


def test_folds_hold_each_query_out_under_the_choice_made_without_its_fold(world, tmp_path, monkeypatch):
    """Hits by logit scale: A hits fold 1, B nothing, their average fold 0 and one query of fold 1. The refit keeps
    the average; without fold 0 greedy keeps A alone, so fold 0's held-out hits are A's (none)."""
    tids = sorted(r["text_id"] for r in read_jsonl(world.data / "valid_texts.jsonl"))
    f0, f1 = id_folds(tids, 2, seed=7)
    table = {1.0: np.isin(np.arange(16), f1), 3.0: np.zeros(16, bool), 2.0: np.isin(np.arange(16), [*f0, f1[0]])}
    encoded = []

    def fake_encode(self, source):
        encoded.append(float(methods.weights_of(source)["logit_scale"]))
        return tids, np.repeat(table[encoded[-1]][:, None], 3, axis=1)

    monkeypatch.setattr(Scorer, "_encode", fake_encode)
    sd = _sd(world.base)
    paths = [
        save_checkpoint(tmp_path / f"{n}.pt", {**sd, "logit_scale": torch.tensor(s)}, world.config)
        for n, s in (("a", 1.0), ("b", 3.0))
    ]
    argv = ["--checkpoints", *paths, "--method greedy --device cpu --seed 7 --val-data", world.lmdb("valid")]
    cf = run(*argv, "--folds", "2", "--output", tmp_path / "cf")["soups"]["greedy"]
    assert sorted(encoded) == [1.0, 2.0, 3.0]  # each candidate encoded once, whatever the folds
    assert [fm["members"] for fm in cf["crossfit"]["fold_members"]] == [[str(paths[0])], list(map(str, paths))]
    assert cf["members"] == list(map(str, paths)) and cf["crossfit"]["refit_mean_recall"] == 100 * 9 / 16
    ids, held = read_hits(tmp_path / "cf" / cf["crossfit"]["hits"])
    want = {tids[i]: [False] * 3 for i in f0} | {tids[i]: [i == f1[0]] * 3 for i in f1}  # A's on fold 0
    assert {t: h.tolist() for t, h in zip(ids.tolist(), held)} == want
    assert cf["crossfit"]["fold_scores"] == [0.0, 12.5]
    [entry] = read_soup(tmp_path / "cf", "cf")  # compare's held-out column: the cross-fit mean
    assert (entry.held_out, entry.extra["crossfit"]["low"]) == (cf["crossfit"]["mean"], cf["crossfit"]["low"])
