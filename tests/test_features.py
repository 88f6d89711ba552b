"""Feature extraction and encoding: stored config, prompt, formats, the image cache, upstream's extractor as referee."""

import base64
import io
import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import cn_clip
import numpy as np
import pytest
import torch
from cli_helpers import one_error_line, snapshot
from oracles import stable_topk
from PIL import Image

from cn_clip_patch.device import on_device
from cn_clip_patch.prompt import tokenize
from solution.common import SolutionError
from solution.data.lmdb_io import LMDBSplit, write_split
from solution.features import build_parser, main
from solution.formats.feature_files import load_features
from solution.model import ModelConfig, build_model, save_checkpoint
from solution.model.precision import PRECISIONS, effective_precision, exact_math, model_math, precision_flag
from solution.retrieval import extract as cache
from solution.retrieval.encode import encode_images, encode_texts, evaluate_split, token_batches
from solution.retrieval.rank import checkpoint_validation

PROMPT = "这是一张商品图片："
TEXTS = ["红色连衣裙", "男士运动鞋 透气 轻便 夏季新款", "苹果手机壳", "儿童玩具车", "Nike 跑步鞋 “轻便”", "保温杯500ML"]


def _b64_image(rng, size):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.urlsafe_b64encode(buf.getvalue())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("feat")
    rng = np.random.default_rng(0)
    images = [(100 + i, _b64_image(rng, (24 + 3 * i, 40))) for i in range(12)]
    images.append((99, _b64_image(rng, (20, 20))))  # key "99" sorts after "111": LMDB key order is not numeric
    write_split(d / "lmdb" / "valid", images, [(100 + i, 1000 + i, t) for i, t in enumerate(TEXTS)])
    lines = [json.dumps({"text_id": 1000 + i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(TEXTS)]
    (d / "valid_texts.jsonl").write_text("".join(lines), encoding="utf-8")
    return d


def _checkpoint(path, seed=0, prompt=PROMPT, model_info=None, **extra):
    lora = {"mode": "lora", "lora": {"r": 4, "alpha": 8}, "merged": True}  # what the trainer stores
    cfg = ModelConfig("ViT-Tiny", "RBT-Tiny", 32, prompt, lora, **({"model_info": model_info} if model_info else {}))
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    save_checkpoint(path, model.state_dict(), cfg, epoch=1, step=10, **extra)
    return model, cfg


def _run(data, ckpt, out, *extra, fmt="npy"):
    return main(
        f"--extract-image-feats --extract-text-feats --image-data {data}/lmdb/valid/imgs --resume {ckpt} --format {fmt}"
        f" --text-data {data}/valid_texts.jsonl --image-feat-output-path {out}/img.{fmt} --cache-dir {out}/cache"
        f" --text-feat-output-path {out}/txt.{fmt} --num-workers 0 --no-progress".split()
        + list(extra)
    )


def test_prompt_checkpoint_extracts_with_its_prompt_in_both_formats(data, tmp_path, caplog):
    model, cfg = _checkpoint(tmp_path / "ckpt.pt")
    _run(data, tmp_path / "ckpt.pt", tmp_path / "a")
    txt, img = load_features(tmp_path / "a/txt.npy", "text"), load_features(tmp_path / "a/img.npy", "image")
    assert txt.ids.tolist() == list(range(1000, 1006))
    np.testing.assert_allclose(txt.feats, encode_texts(model, TEXTS, cfg), atol=1e-6)
    assert txt.meta["prompt"] == PROMPT and txt.meta["config"]["tuning"]["mode"] == "lora"  # no flags needed
    assert img.ids.tolist() == LMDBSplit(data / "lmdb/valid").image_ids() and img.ids[-1] == 99  # key order
    np.testing.assert_allclose(img.feats, encode_images(model, data / "lmdb/valid", cfg)[1], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(img.feats, axis=1), 1, atol=1e-5)
    r = _run(data, tmp_path / "ckpt.pt", tmp_path / "j", "--cache-dir", str(tmp_path / "a/cache"), fmt="jsonl")
    assert r["image"]["cache"] == "hit" and (tmp_path / "j/img.meta.json").is_file()  # cn_clip's JSON lines
    for kind, name in (("image", "img"), ("text", "txt")):
        x, y = load_features(tmp_path / f"a/{name}.npy", kind), load_features(tmp_path / f"j/{name}.jsonl", kind)
        assert x.ids.tolist() == y.ids.tolist()
        np.testing.assert_array_equal(x.feats, y.feats)  # float32 round-trips through JSON exactly
    _run(data, tmp_path / "ckpt.pt", tmp_path / "b", "--prompt", "")  # the stored prompt matters
    plain = load_features(tmp_path / "b/txt.npy", "text").feats
    assert "text_prompt is" in caplog.text and "on the command line" in caplog.text
    no_prompt = ModelConfig.from_dict({**cfg.to_dict(), "text_prompt": ""})
    assert np.abs(plain - txt.feats).max() > 1e-3
    np.testing.assert_allclose(plain, encode_texts(model, TEXTS, no_prompt), atol=1e-6)


def test_image_cache_hit_and_invalidation(data, tmp_path, monkeypatch):
    calls, real = [], cache.encode_images
    monkeypatch.setattr(cache, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    _checkpoint(tmp_path / "ckpt.pt")
    assert _run(data, tmp_path / "ckpt.pt", tmp_path / "o")["image"]["cache"] == "miss"
    first = load_features(tmp_path / "o/img.npy", "image").feats
    assert _run(data, tmp_path / "ckpt.pt", tmp_path / "o")["image"]["cache"] == "hit" and len(calls) == 1
    np.testing.assert_array_equal(load_features(tmp_path / "o/img.npy", "image").feats, first)
    (entry,) = (tmp_path / "o/cache").glob("img_*[0-9a-f].npy")  # replaced by noise of the same shape: encoded again
    np.save(entry, np.random.default_rng(0).normal(size=first.shape).astype(np.float32))
    assert _run(data, tmp_path / "ckpt.pt", tmp_path / "o")["image"]["cache"] == "miss" and len(calls) == 2
    np.testing.assert_array_equal(load_features(tmp_path / "o/img.npy", "image").feats, first)
    _checkpoint(tmp_path / "ckpt.pt", seed=1)  # same architecture, other weights: the cache must not answer
    assert _run(data, tmp_path / "ckpt.pt", tmp_path / "o")["image"]["cache"] == "miss" and len(calls) == 3
    second = load_features(tmp_path / "o/img.npy", "image")
    assert np.abs(second.feats - first).max() > 1e-3
    model, cfg = _checkpoint(tmp_path / "ckpt2.pt", seed=1, prompt="")  # another text tower and prompt: a hit
    sd = model.state_dict()
    sd["bert.embeddings.word_embeddings.weight"] = sd["bert.embeddings.word_embeddings.weight"] + 0.1
    save_checkpoint(tmp_path / "ckpt2.pt", sd, cfg)
    assert _run(data, tmp_path / "ckpt2.pt", tmp_path / "o")["image"]["cache"] == "hit" and len(calls) == 3
    workers = ("--no-cache", "--num-workers", "1", "--img-batch-size", "5")  # a loader worker: the same features
    assert _run(data, tmp_path / "ckpt.pt", tmp_path / "o", *workers)["image"]["cache"] == "off" and len(calls) == 4
    got = load_features(tmp_path / "o/img.npy", "image")
    assert got.ids.tolist() == second.ids.tolist()
    np.testing.assert_allclose(got.feats, second.feats, atol=1e-6)


def test_validation_score_of_the_run_or_stored_reaches_the_manifest(data, tmp_path, caplog):
    from solution.predict import main as predict

    run = tmp_path / "logs" / "r1"
    _checkpoint(run / "checkpoints" / "best.pt")  # at step 10
    rows = [
        {"step": 5, "epoch": 0, "kind": "valid", "r1": 1.0, "r5": 2.0, "r10": 3.0, "mean_recall": 2.0},
        {"step": 10, "epoch": 1, "kind": "valid", "set": "other", "mean_recall": 9.0},
        {"step": 10, "epoch": 1, "kind": "valid", "r1": 4.0, "r5": 5.0, "r10": 6.0, "mean_recall": 5.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "kind": "tr')
    _run(data, run / "checkpoints" / "best.pt", tmp_path / "o")
    want = {**{k: v for k, v in rows[2].items() if k != "kind"}, "source": str(run / "metrics.jsonl")}
    assert load_features(tmp_path / "o/txt.npy", "text").meta["validation"] == want and "torn by a kill" in caplog.text
    feats = ["--image-feats", str(tmp_path / "o/img.npy"), "--text-feats", str(tmp_path / "o/txt.npy")]
    predict([*feats, "--output", str(tmp_path / "sub/s.jsonl"), "--top-k", "5"])
    man = json.loads((tmp_path / "sub/s.json").read_text())
    assert man["validation"]["r1"] == 4.0 and man["prompt"] == PROMPT
    assert man["checkpoints"][0]["path"] == str((run / "checkpoints" / "best.pt").resolve())
    stored = run / "checkpoints" / "epoch_1.pt"  # the trainer's best.pt carries its record under "metrics": it wins
    _checkpoint(stored, metrics={"r1": 7.0, "r5": 8.0, "r10": 9.0, "mean_recall": 8.0, "step": 10})
    _run(data, stored, tmp_path / "o2")
    assert load_features(tmp_path / "o2/img.npy", "image").meta["validation"]["mean_recall"] == 8.0
    assert checkpoint_validation(stored, {"step": 12}) is None  # no record at its step
    assert checkpoint_validation(tmp_path / "loose.pt", {"step": 10}) is None  # no run folder to read


@pytest.mark.filterwarnings("ignore:'pin_memory' argument")
def test_equals_upstream_extract_features(data, tmp_path, monkeypatch):
    """cn_clip's own extract_features.py (fp32, CPU), run from a shadow tree (its script, our tiny configs under its
    model names; 224 pixels for its resolution lookup): the same features to 1e-5."""
    info = {**ModelConfig("ViT-Tiny", "RBT-Tiny").model_info, "image_resolution": 224, "vision_patch_size": 32}
    _checkpoint(tmp_path / "ckpt.pt", prompt="", model_info=info)
    shadow = tmp_path / "shadow"
    (shadow / "eval").mkdir(parents=True)
    (shadow / "clip" / "model_configs").mkdir(parents=True)
    os.symlink(Path(cn_clip.__file__).parent / "eval" / "extract_features.py", shadow / "eval" / "extract_features.py")
    vision = {k: v for k, v in info.items() if k.startswith("vision") or k in ("embed_dim", "image_resolution")}
    for name, cfg in (("ViT-B-16", vision), ("RBT3-chinese", {k: v for k, v in info.items() if k not in vision})):
        (shadow / f"clip/model_configs/{name}.json").write_text(json.dumps(cfg))
    common = (
        f"--extract-image-feats --extract-text-feats --image-data {data}/lmdb/valid/imgs --text-data"
        f" {data}/valid_texts.jsonl --resume {tmp_path}/ckpt.pt --context-length 32 --precision fp32"
        " --img-batch-size 4 --text-batch-size 4".split()
    )
    up = f"--vision-model ViT-B-16 --text-model RBT3-chinese --image-feat-output-path {tmp_path}/up_img.jsonl"
    up += f" --text-feat-output-path {tmp_path}/up_txt.jsonl"
    monkeypatch.setattr(sys, "argv", ["extract_features.py", *common, *up.split()])
    with on_device("cpu"):
        runpy.run_path(str(shadow / "eval" / "extract_features.py"), run_name="__main__")
    ours = ["--image-feat-output-path", str(tmp_path / "img.npy"), "--text-feat-output-path", str(tmp_path / "txt.npy")]
    main([*common, *ours, "--no-cache", "--no-progress"])
    for kind, up_file, our_file in (("image", "up_img.jsonl", "img.npy"), ("text", "up_txt.jsonl", "txt.npy")):
        a, b = load_features(tmp_path / up_file, kind), load_features(tmp_path / our_file, kind)
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_allclose(b.feats, a.feats, atol=1e-5, rtol=0)


def test_token_batches_respect_the_budget_and_text_batching_changes_no_feature(tiny_model, tiny_config):
    lengths = np.array([3, 3, 4, 5, 5, 5, 9, 20, 52, 52])
    assert [b.tolist() for b in token_batches(lengths, np.arange(10), 40)] == [[0, 1, 2, 3, 4, 5], [6, 7], [8], [9]]
    rng = np.random.default_rng(0)
    for budget in (1, 20, 104, 3328, 10_000):  # every text once; padded tokens within budget (or one text)
        for lengths in (np.array([3, 3, 4, 5, 5, 5, 9, 20, 52, 52]), np.sort(rng.integers(3, 53, 500))):
            order = rng.permutation(len(lengths))
            batches = token_batches(lengths, order, budget)
            assert sorted(np.concatenate(batches).tolist()) == sorted(order.tolist())
            pos = {int(t): i for i, t in enumerate(order)}  # text -> its sorted length
            assert all(len(b) == 1 or len(b) * max(int(lengths[pos[int(t)]]) for t in b) <= budget for b in batches)
            assert [int(t) for b in batches for t in b] == order.tolist()  # consecutive, in order
    texts = TEXTS * 3 + ["一" * 40]
    with torch.inference_mode():
        padded = tiny_model.eval().encode_text(tokenize(texts, tiny_config.context_length, trim=False))
    padded = (padded / padded.norm(dim=-1, keepdim=True)).numpy()
    for bs in (1, 4, 64):
        np.testing.assert_allclose(encode_texts(tiny_model, texts, tiny_config, batch_size=bs), padded, atol=1e-5)


BAD = {
    # name: (flags replacing the defaults ("T": the test's folder), words the one error line holds, "|"-separated)
    "nothing to do": ("", "nothing to do"),
    "missing checkpoint": ("--resume T/none.pt", "not found|none.pt"),
    "a text record without text_id": ("--text-data T/no_id.jsonl", "no_id.jsonl|record 2 lacks text_id"),
    "texts not UTF-8": ("--text-data T/latin1.jsonl", "latin1.jsonl:2|not UTF-8"),
    "no room for the prompt": ("--context-length 8", "no room"),
    "image data not an LMDB": ("--image-data T/o", "not an LMDB split"),
    "text output is the text data": ("--format jsonl --text-feat-output-path T/texts.jsonl", "texts.jsonl|refusing"),
    "text output is the checkpoint": ("--format jsonl --text-feat-output-path T/ckpt.pt", "ckpt.pt|refusing"),
    "image output is the LMDB": ("--format jsonl --image-feat-output-path T/lmdb/imgs/data.mdb", "data.mdb|refusing"),
    "image and text output the same": (
        "--image-feat-output-path T/o/x --text-feat-output-path T/o/x.npy",
        "--image-feat-output-path|--text-feat-output-path|x.npy|both write",
    ),
    "output is a folder": ("--text-feat-output-path T/folder.npy", "folder.npy|is a folder"),
    "output under a file": ("--image-feat-output-path T/texts.jsonl/img.npy", "texts.jsonl|which is a file"),
    "output replaces another file": ("--image-feat-output-path T/user.npy", "user.npy exists and is not an earlier"),
    "output replaces a checkpoint": ("--format jsonl --image-feat-output-path T/other.pt", "other.pt exists"),
    "a checkpoint of bare weights": ("--resume T/bare.pt", "bare.pt holds bare weights|--context-length"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_and_outputs_one_line_nothing_written(data, tmp_path, capsys, monkeypatch, case):
    _checkpoint(tmp_path / "ckpt.pt")
    shutil.copytree(data / "lmdb" / "valid", tmp_path / "lmdb")
    shutil.copy(data / "valid_texts.jsonl", tmp_path / "texts.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text_id": 1, "text": "a"}\n{"text_id": 2, "text": "caf\xe9"}\n')
    (tmp_path / "no_id.jsonl").write_text('{"text_id": 1, "text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    (tmp_path / "folder.npy").mkdir()
    np.save(tmp_path / "user.npy", np.zeros((3, 4), np.float32))
    torch.save(dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["state_dict"]), tmp_path / "bare.pt")
    shutil.copy(tmp_path / "ckpt.pt", tmp_path / "other.pt")
    (tmp_path / "o").mkdir()
    flags, words = BAD[case]
    given = flags.replace("T/", f"{tmp_path}/").split()
    ext = "jsonl" if "jsonl" in given else "npy"
    argv = {
        "--image-data": f"{tmp_path}/lmdb/imgs",
        "--text-data": f"{tmp_path}/texts.jsonl",
        "--resume": f"{tmp_path}/ckpt.pt",
        "--image-feat-output-path": f"{tmp_path}/o/img.{ext}",
        "--text-feat-output-path": f"{tmp_path}/o/txt.{ext}",
        "--cache-dir": f"{tmp_path}/cache",
        **dict(zip(given[::2], given[1::2])),
    }
    what = [] if case == "nothing to do" else ["--extract-image-feats", "--extract-text-feats"]
    before = snapshot(tmp_path)
    code, line = one_error_line(capsys, monkeypatch, main, [*what, "--no-progress", *sum(argv.items(), ())])
    assert code == 2 and all(w in line for w in words.split("|")), line
    assert snapshot(tmp_path) == before  # nothing written


def test_validation_scores_only_decodable_gold_images(tmp_path, tiny_model, tiny_config, caplog):
    """An undecodable image is no miss; a query whose every gold image is undecodable is not scored."""
    rng = np.random.default_rng(1)
    good = [(i, _b64_image(rng, (20, 20))) for i in (1, 2, 3, 4)]
    corrupt = (5, base64.urlsafe_b64encode(b"\xff\xd8\xff\xe0 not really a JPEG"))
    pairs = [(1, 10, "红色"), (5, 10, "红色"), (5, 11, "蓝色"), (2, 12, "绿色"), (3, 13, "黄色"), (4, 13, "黄色")]
    write_split(tmp_path / "valid", [*good, corrupt], pairs)
    r = evaluate_split(tiny_model, tmp_path / "valid", tiny_config, batch_size=2)
    assert r["undecodable_images"] == 1 and r["queries_scored"] == 3  # text 11 (only image 5) is not scored
    assert r["r5"] == r["r10"] == 100.0  # four images decode: every scored query finds one in its top 5
    ids, img = encode_images(tiny_model, tmp_path / "valid", tiny_config)
    txt = encode_texts(tiny_model, ["红色", "绿色", "黄色"], tiny_config)
    vals, top = stable_topk(np.asarray(txt, np.float64) @ np.asarray(img, np.float64).T, 2)  # R@1 by hand
    assert (vals[:, 0] - vals[:, 1] > 1e-5).all()  # no near tie: float32 and float64 agree on the first
    hits = sum(int(ids[top[i, 0]]) in g for i, g in enumerate(({1}, {2}, {3, 4})))
    assert r["r1"] == (hits * 1.0 / 3) * 100
    assert "1 of 5 images could not be decoded" in caplog.text and "1 of 4 queries" in caplog.text
    write_split(tmp_path / "bad", [corrupt], [(5, 11, "蓝色")])
    with pytest.raises(SolutionError, match="no decodable images"):
        evaluate_split(tiny_model, tmp_path / "bad", tiny_config)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_effective_precision_and_amp_bf16(device):
    want = {"amp": "fp16", "fp16": "fp16", "fp32": "fp32", "bf16": "bf16"} if device == "cuda" else {"bf16": "bf16"}
    assert [effective_precision(device, p) for p in PRECISIONS] == [want.get(p, "fp32") for p in PRECISIONS]
    assert precision_flag("amp_bf16") == "bf16" and effective_precision(device, "amp_bf16") == "bf16"
    assert build_parser().parse_args(["--resume", "x.pt", "--precision", "amp_bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--resume", "x.pt", "--precision", "bf17"])


def test_ranking_runs_at_highest_precision_whatever_the_caller_set(monkeypatch):
    """The caller asked for 'high' (TF32 on CUDA, oneDNN TF32 on the CPU): every exact ranking product runs at
    'highest' (no bf16 reduced-precision reductions either), and the caller's setting is back afterwards."""
    from solution.ensembles.fusion import rerank_topk
    from solution.retrieval.rank import topk

    cuda, mkl = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    seen, real_topk = [], torch.topk

    def spy(*a, **k):
        seen.append((cuda.allow_tf32, cuda.allow_bf16_reduced_precision_reduction, mkl.fp32_precision))
        return real_topk(*a, **k)

    gallery = np.arange(64 * 4, dtype=np.float32).reshape(64, 4) % 7 - 3  # small integers: exact products
    queries = np.eye(4, dtype=np.float32)[:3]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with monkeypatch.context() as m:
            m.setattr(torch, "topk", spy)
            got = [topk(queries, gallery, 2)[1], rerank_topk([(queries, gallery)], 2)[1]]
        assert len(seen) >= 2 and set(seen) == {(False, False, "ieee")}
        assert torch.get_float32_matmul_precision() == "high" and cuda.allow_tf32 and mkl.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    best = stable_topk(queries.astype(np.float64) @ gallery.astype(np.float64).T, 2)[1]
    assert all((g == best).all() for g in got)


def test_model_math_allows_tf32_on_cuda_only_and_restores():
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (cuda.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision())
    assert not cuda.allow_tf32
    with model_math("cpu"):
        assert (cuda.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision()) == before
    with model_math(torch.device("cuda", 0)):
        assert cuda.allow_tf32 and cudnn.allow_tf32
        with exact_math():  # ranking inside a training run: exact again
            assert not cuda.allow_tf32
        assert cuda.allow_tf32
    assert (cuda.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision()) == before
