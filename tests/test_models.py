import json
import os

import pytest
import torch
from oracles import sdpa_enabled

from solution.common import SolutionError
from solution.model import (
    ModelConfig,
    build_model,
    fingerprint,
    load_model,
    meta_model,
    model_template,
    read_checkpoint,
    resolve_config,
    save_checkpoint,
    state_dict_digest,
)
from solution.model.checkpoint import infer_architecture
from solution.model.registry import models, run_model_cli


def test_registry_has_upstream_and_tiny_models_and_extra_folders_for_a_block(tmp_path):
    assert {"ViT-B-16", "ViT-H-14", "RN50", "ViT-Tiny"} <= set(models("vision"))
    assert {"RoBERTa-wwm-ext-base-chinese", "RBT3-chinese", "RBT-Tiny"} <= set(models("text"))
    with pytest.raises(SolutionError, match="unknown model name 'ViT-Nope'"):
        ModelConfig("ViT-Nope", "RBT-Tiny")
    (tmp_path / "ViT-Nope.json").write_text(
        json.dumps({**ModelConfig("ViT-Tiny", "RBT-Tiny").model_info, "vision_width": 32})
    )
    environ = {"SOLUTION_MODEL_CONFIGS": f"{tmp_path}{os.pathsep}{os.pathsep}/nowhere"}
    widths = []
    assert run_model_cli(lambda argv: widths.append(ModelConfig("ViT-Nope", "RBT-Tiny").model_info), environ) == 0
    assert widths[0]["vision_width"] == 32 and "ViT-Nope" not in models("vision")  # known inside the CLI only


def test_checkpoint_round_trip_keeps_config_and_weights(tmp_path, tiny_model):
    cfg = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=24, text_prompt="这是一张图片：")
    path = save_checkpoint(tmp_path / "a.pt", tiny_model.state_dict(), cfg, epoch=2, step=7, name="run")
    assert all(k.startswith("module.") for k in torch.load(path, weights_only=True)["state_dict"])  # cn_clip's layout
    model, config, ckpt = load_model(path)
    assert (config.text_prompt, config.context_length, ckpt["epoch"], ckpt["step"]) == ("这是一张图片：", 24, 2, 7)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    model.visual.proj.data.add_(1)  # the model owns its weights: the checkpoint read (memory-mapped) is untouched
    assert torch.equal(ckpt["state_dict"]["module.visual.proj"], tiny_model.visual.proj)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_fingerprint_is_the_digest_of_the_clean_weights(tmp_path, tiny_model, tiny_config):
    """What ensemble.json records of a member: the weights' digest, whatever prefix, pooler or extras the file has."""
    sd = tiny_model.state_dict()
    a = save_checkpoint(tmp_path / "a.pt", sd, tiny_config, epoch=1)
    raw = {**{f"module.{k}": v for k, v in sd.items()}, "module.bert.pooler.dense.weight": torch.ones(2)}
    torch.save({"state_dict": raw, "optimizer": {"lr": 1.0}}, tmp_path / "b.pt")
    assert fingerprint(a) == fingerprint(tmp_path / "b.pt") == fingerprint(read_checkpoint(a)) == state_dict_digest(sd)
    other = {k: v + 1 if k == "logit_scale" else v for k, v in sd.items()}
    assert fingerprint(save_checkpoint(tmp_path / "c.pt", other, tiny_config)) != fingerprint(a)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("content", ["empty", "html", "truncated", "code"])
def test_unreadable_checkpoints_are_one_clear_error(tmp_path, tiny_model, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        save_checkpoint(path, tiny_model.state_dict(), ModelConfig("ViT-Tiny", "RBT-Tiny"))
        path.write_bytes(path.read_bytes()[:1000])
    elif content == "code":
        torch.save({"state_dict": {}, "x": Evil()}, path)
    else:
        path.write_bytes(b"" if content == "empty" else b"<html>not a checkpoint</html>")
    with pytest.raises(SolutionError, match="bad.pt (is empty|is not a readable checkpoint)"):
        read_checkpoint(path)


def test_flags_override_stored_config_with_warning(tiny_model, caplog):
    ckpt = {
        "state_dict": tiny_model.state_dict(),
        "config": ModelConfig("ViT-Tiny", "RBT-Tiny", text_prompt="a").to_dict(),
    }
    cfg = resolve_config(ckpt, text_prompt="b", source="x.pt")
    assert cfg.text_prompt == "b" and "text_prompt is 'a' in the checkpoint" in caplog.text


def test_another_or_an_unknown_architecture_on_the_command_line_is_refused_naming_it(tmp_path, tiny_model):
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_model.state_dict().items()}}, tmp_path / "t.pt")
    with pytest.raises(SolutionError, match=r"ViT-Tiny@RBT-Tiny model, not ViT-B-16@RBT-Tiny"):
        load_model(tmp_path / "t.pt", vision_model="ViT-B-16")
    with pytest.raises(SolutionError, match=r"^--vision-model: unknown model name 'ViT-Nope'; known vision models: "):
        load_model(tmp_path / "t.pt", vision_model="ViT-Nope")
    with pytest.raises(SolutionError, match=r"^--text-model: 'ViT-Tiny' is not a text model config"):
        load_model(tmp_path / "t.pt", text_model="ViT-Tiny")


def test_shape_errors_name_the_tensors_and_their_shapes(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    sd["visual.positional_embedding"] = sd["visual.positional_embedding"][:, 0].clone()  # 1-D: not resizable
    del sd["logit_scale"]
    save_checkpoint(tmp_path / "p.pt", sd, ModelConfig("ViT-Tiny", "RBT-Tiny"))
    with pytest.raises(SolutionError) as e:
        load_model(tmp_path / "p.pt")
    assert str(e.value) == (
        f"{tmp_path / 'p.pt'} does not fit ViT-Tiny@RBT-Tiny: 1 tensor differs in shape "
        "(visual.positional_embedding 65 vs 65x64); 1 tensor missing (logit_scale)"
    )


def test_infer_architecture_survives_a_partial_resnet_state_dict(tiny_model):
    assert infer_architecture(tiny_model.state_dict()) == ("ViT-Tiny", "RBT-Tiny")
    sd = {"visual.conv1.weight": torch.zeros(32, 3, 3, 3)}
    for layer, blocks in enumerate((3, 4, 6, 3), 1):  # RN50's blocks, but no attention pool: no KeyError
        sd.update({f"visual.layer{layer}.{b}.conv1.weight": torch.zeros(1) for b in range(blocks)})
    assert infer_architecture(sd) == (None, None)


def test_meta_model_and_template_match_the_built_model(tiny_config, tiny_model):
    """The meta-device model has the built model's tensors; given storage and weights it computes the same."""
    meta = meta_model(tiny_config)
    assert all(t.is_meta for t in meta.state_dict().values())
    built = {k: tuple(v.shape) for k, v in tiny_model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == built == model_template(tiny_config)
    meta.to_empty(device="cpu").load_state_dict(tiny_model.state_dict())
    images = torch.randn(2, 3, tiny_config.image_resolution, tiny_config.image_resolution)
    with torch.no_grad():
        assert torch.equal(meta.eval().encode_image(images), tiny_model.eval().encode_image(images))


def test_models_are_built_and_loaded_on_sdpa_attention_by_default(tmp_path, tiny_config, tiny_model):
    assert sdpa_enabled(tiny_model) and not sdpa_enabled(build_model(tiny_config, attn_impl="upstream"))
    assert sdpa_enabled(meta_model(tiny_config)) and not sdpa_enabled(meta_model(tiny_config, attn_impl="upstream"))
    path = save_checkpoint(tmp_path / "a.pt", tiny_model.state_dict(), tiny_config, epoch=1, step=1)
    sdpa, upstream = load_model(path)[0], load_model(path, attn_impl="upstream")[0]
    assert sdpa_enabled(sdpa) and not sdpa_enabled(upstream)
    assert sdpa.state_dict().keys() == upstream.state_dict().keys() == tiny_model.state_dict().keys()
    with pytest.raises(SolutionError, match="unknown attention implementation 'flash': use one of sdpa, upstream"):
        load_model(path, attn_impl="flash")
