"""``python -m solution.export``: transformers and ONNX exports give the toolkit's features and token ids."""

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
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


@pytest.fixture(scope="module")
def tiny(world, tmp_path_factory):
    """A fine-tuned ViT-Tiny + RBT-Tiny run's checkpoint with a prompt in its config, and its model."""
    ck = read_checkpoint(world.runs[0] / "checkpoints" / "best.pt")
    config = ModelConfig.from_dict({**ck["config"], "text_prompt": PROMPT})
    path = save_checkpoint(tmp_path_factory.mktemp("export") / "tiny.pt", ck["state_dict"], config)
    return path, *load_model(path)[:2]


@pytest.fixture(scope="module")
def vitb(tmp_path_factory):
    """A random ViT-B-16 + RoBERTa-wwm-ext-base in the official format (no config, ``module.`` keys, fp16),
    and the model with those weights (the fp16 values in fp32, as the loader makes them)."""
    config = ModelConfig("ViT-B-16", "RoBERTa-wwm-ext-base-chinese")
    torch.manual_seed(0)
    model = build_model(config).half().float()
    path = tmp_path_factory.mktemp("export") / "clip_cn_vit-b-16.pt"
    torch.save(
        {"epoch": 1, "step": 1, "state_dict": {f"module.{k}": v.half() for k, v in model.state_dict().items()}}, path
    )
    return path, model, config


@pytest.fixture(scope="module", params=[("tiny", 7), ("vitb", 2)], ids=["tiny", "vitb"])
def reference(request, world):
    """A checkpoint, its config, demo images (PIL; 2 for the slow full-size model) and the toolkit's
    features of them and of TEXTS."""
    name, n_images = request.param
    path, model, config = request.getfixturevalue(name)
    split = LMDBSplit(world.lmdb("valid"))
    ids = split.image_ids()[:n_images]
    images = [decode_image(split.image_b64(i)) for i in ids]
    _, image_feats = encode_images(model, split, config, image_ids=ids)
    text_feats = encode_texts(model, TEXTS, config)
    return path, config, images, image_feats, text_feats


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_transformers_export_gives_the_toolkits_features_and_token_ids(reference, tmp_path, capsys):
    path, config, images, image_feats, text_feats = reference
    out = tmp_path / "hf"
    main(["--checkpoint", str(path), "--format", "hf", "--output", str(out)])
    assert (repr(config.text_prompt) if config.text_prompt else "text prompt: none") in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["cn_clip_text_prompt"] == config.text_prompt

    model, info = ChineseCLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched weights
    processor = ChineseCLIPProcessor.from_pretrained(out)
    inputs = processor(
        text=[config.text_prompt + t for t in TEXTS], images=images, padding=True, truncation=True, return_tensors="pt"
    )
    assert torch.equal(inputs["input_ids"], tokenize(TEXTS, config.context_length, config.text_prompt))
    pil = ChineseCLIPProcessor.from_pretrained(out, backend="pil")(images=images, return_tensors="pt")
    torch.testing.assert_close(
        pil["pixel_values"], torch.stack([eval_transform(config.image_resolution)(im) for im in images])
    )
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
    assert cosines(image, image_feats).min() >= 0.9999
    assert cosines(text, text_feats).min() >= 0.9999


def test_onnx_export_gives_the_toolkits_features_at_any_batch_and_length(reference, tmp_path):
    path, config, images, image_feats, text_feats = reference
    out = tmp_path / "onnx"
    assert run_cli(main, ["--checkpoint", str(path), "--format", "onnx", "--output", str(out)]) == 0
    pixels = torch.stack([eval_transform(config.image_resolution)(im) for im in images]).numpy()
    image, text = (
        ort.InferenceSession(out / f"{t}.onnx", providers=["CPUExecutionProvider"]) for t in ("image", "text")
    )
    for batch in (1, len(images)):
        got = image.run(None, {"pixel_values": pixels[:batch]})[0]
        assert got.shape == (batch, image_feats.shape[1]) and cosines(got, image_feats[:batch]).min() >= 0.9999
    for batch in (1, 7):
        ids = tokenize(TEXTS[:batch], config.context_length, config.text_prompt).numpy()  # cut to the batch's longest
        got = text.run(None, {"input_ids": ids})[0]
        assert got.shape == (batch, text_feats.shape[1]) and cosines(got, text_feats[:batch]).min() >= 0.9999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # L2-normalised, as the toolkit's


def test_export_refusals_are_one_line(world, tmp_path, monkeypatch, capsys):
    def refused(*argv) -> str:
        assert run_cli(main, ["--checkpoint", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        return err[0]

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
