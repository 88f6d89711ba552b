"""``python -m solution.export``: transformers and ONNX exports give the toolkit's features and token ids."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from train_helpers import error_line
from transformers import ChineseCLIPModel, ChineseCLIPProcessor

from cn_clip_patch.prompt import tokenize
from solution.common import run_cli
from solution.data.datasets import decode_image, eval_transform
from solution.data.lmdb_io import LMDBSplit
from solution.export import main
from solution.model import ModelConfig, build_model, load_model, read_checkpoint, save_checkpoint
from solution.retrieval.encode import encode_images, encode_texts

PROMPT = "这是一张图片，里面存在商品："
TEXTS = [
    "红色连衣裙",
    "“男士”运动鞋 NIKE Air",  # curly quotes and upper case: cn_clip normalises both
    "儿童玩具车遥控越野" * 8,  # longer than the context: truncated
    "保温杯 500ML",
    "苹果手机壳",
    "家用厨房收纳盒",
    "蓝牙耳机",
]


pytestmark = pytest.mark.xdist_group("export")  # one worker builds each reference model once


@pytest.fixture(scope="module", params=["tiny", "vitb"])
def case(request, world, tmp_path_factory):
    """A checkpoint (tiny: a fine-tune with a prompt; vitb: a random ViT-B-16 + RoBERTa-wwm-ext-base in the official
    format: no config, ``module.`` keys, fp16, BERT's pooler), demo images (PIL), texts, the toolkit's features of both."""
    path = tmp_path_factory.mktemp("export") / f"{request.param}.pt"
    if request.param == "tiny":
        ck = read_checkpoint(world.runs[0] / "checkpoints" / "best.pt")
        save_checkpoint(path, ck["state_dict"], ModelConfig.from_dict({**ck["config"], "text_prompt": PROMPT}))
        n_images, n_texts = 7, 7
    else:
        torch.manual_seed(0)
        sd = build_model(ModelConfig("ViT-B-16", "RoBERTa-wwm-ext-base-chinese")).state_dict()
        sd = {f"module.{k}": v.half() for k, v in sd.items()}
        sd["module.bert.pooler.dense.weight"] = torch.zeros(4, 4, dtype=torch.half)  # as official files carry
        torch.save({"epoch": 1, "step": 1, "state_dict": sd}, path)
        n_images, n_texts = 2, 3
    model, config, _ = load_model(path)
    split = LMDBSplit(world.lmdb("valid"))
    ids = split.image_ids()[:n_images]
    _, image_feats = encode_images(model, split, config, image_ids=ids)
    images = [decode_image(split.image_b64(i)) for i in ids]
    texts = TEXTS[:n_texts]
    text_feats = encode_texts(model, texts, config)
    return SimpleNamespace(
        path=path,
        config=config,
        images=images,
        image_feats=image_feats,
        texts=texts,
        text_feats=text_feats,
    )


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_transformers_export_gives_the_toolkits_features_and_token_ids(case, tmp_path, capsys):
    config, out = case.config, tmp_path / "hf"
    main(["--checkpoint", str(case.path), "--format", "hf", "--output", str(out)])
    assert (repr(config.text_prompt) if config.text_prompt else "text prompt: none") in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["cn_clip_text_prompt"] == config.text_prompt

    model, info = ChineseCLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched weights
    processor = ChineseCLIPProcessor.from_pretrained(out)
    prompted = [config.text_prompt + t for t in TEXTS]
    tokens = processor(text=prompted, padding=True, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(tokens, tokenize(TEXTS, config.context_length, config.text_prompt))
    inputs = processor(
        text=prompted[: len(case.texts)], images=case.images, padding=True, truncation=True, return_tensors="pt"
    )
    pil = ChineseCLIPProcessor.from_pretrained(out, backend="pil")(images=case.images, return_tensors="pt")
    torch.testing.assert_close(
        pil["pixel_values"], torch.stack([eval_transform(config.image_resolution)(im) for im in case.images])
    )
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert cosines(image, case.image_feats).min() >= 0.9999
    assert cosines(text.pooler_output, case.text_feats).min() >= 0.9999


@pytest.mark.parametrize("case", ["tiny"], indirect=True)  # ViT-B-16 (13 s): scripts/bench_export.py checks it
def test_onnx_export_gives_the_toolkits_features_at_any_batch_and_length(case, tmp_path):
    config, out = case.config, tmp_path / "onnx"
    assert run_cli(main, ["--checkpoint", str(case.path), "--format", "onnx", "--output", str(out)]) == 0
    pixels = torch.stack([eval_transform(config.image_resolution)(im) for im in case.images]).numpy()
    image, text = (
        ort.InferenceSession(out / f"{t}.onnx", providers=["CPUExecutionProvider"]) for t in ("image", "text")
    )
    for n in (1, 7):
        got = image.run(None, {"pixel_values": pixels[:n]})[0]
        assert got.shape == case.image_feats[:n].shape and cosines(got, case.image_feats[:n]).min() >= 0.9999
        ids = tokenize(case.texts[:n], config.context_length, config.text_prompt).numpy()  # cut to the longest
        got = text.run(None, {"input_ids": ids})[0]
        assert got.shape == case.text_feats[:n].shape and cosines(got, case.text_feats[:n]).min() >= 0.9999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # L2-normalised, as the toolkit's


def test_export_refusals_are_one_line(world, tmp_path, monkeypatch, capsys):
    def refused(*argv) -> str:
        return error_line(capsys, ["--checkpoint", *argv], main)

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnx", None)  # the export extra not installed
        assert "pip install" in refused(str(world.base), "--format", "onnx", "--output", str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert "not empty" in refused(str(world.base), "--format", "hf", "--output", str(tmp_path / "full"))
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"

    rn = {"embed_dim": 64, "image_resolution": 64, "vision_layers": "[1, 1, 1, 1]", "vision_width": 8}
    (tmp_path / "RN-Tiny.json").write_text(json.dumps({**rn, "vision_patch_size": None, "vision_head_width": 32}))
    monkeypatch.setattr("solution.model.registry.EXTRA_CONFIG_DIRS", (tmp_path,))
    config = ModelConfig("RN-Tiny", "RBT-Tiny", context_length=32)
    save_checkpoint(tmp_path / "rn.pt", build_model(config).state_dict(), config)
    assert "ResNet" in refused(str(tmp_path / "rn.pt"), "--format", "hf", "--output", str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()
