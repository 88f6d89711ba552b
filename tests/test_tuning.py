"""cn_clip_patch.tuning: LoRA inject/merge on both towers, adapter-only state, frozen towers."""

import json

import pytest
import torch
from cn_clip.clip.model import CLIP

from cn_clip_patch.tuning import (
    adapter_state_dict,
    apply_tuning,
    has_lora,
    merged_state_dict,
    set_train_mode,
    trainable_summary,
    tuning_recipe,
)
from solution.model import ModelConfig, build_model


def _inputs(n=3, res=64, length=10):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, res, res, generator=g)
    tokens = torch.randint(200, 5000, (n, length), generator=g)
    tokens[:, 0], tokens[:, -1] = 101, 102
    return images, tokens


def _lora_model(tiny_config, rank=4):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    apply_tuning(model, tuning_recipe(lora_rank=rank))
    with torch.no_grad():  # peft starts with B = 0 (a no-op); make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


def test_lora_adapts_both_towers_and_freezes_the_rest(tiny_config):
    model = _lora_model(tiny_config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("visual.") and "attn" in n and "lora_A" in n for n in names)
    assert any(n.startswith("visual.") and "out_proj" in n and "lora_A" in n for n in names)
    for qkv in ("query", "key", "value"):
        assert any(n.startswith("bert.") and f".{qkv}." in n and "lora_B" in n for n in names)
    assert set(names) - {"logit_scale"} == {n for n in names if "lora_" in n}
    trainable, total = trainable_summary(model)
    assert 0 < trainable < total / 50
    assert has_lora(model)
    ad = adapter_state_dict(model)  # the adapters alone: what a fresh LoRA model misses is exactly the rest
    assert ad and all("lora_" in k for k in ad)
    fresh = build_model(tiny_config)
    apply_tuning(fresh, tuning_recipe(lora_rank=4))
    missing, unexpected = fresh.load_state_dict(ad, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)


def test_merged_state_dict_is_a_copy_that_loads_in_plain_clip_with_same_outputs(tiny_config):
    """Saving merges CPU copies of the layers (no second model on an accelerator): every tensor a copy on the
    device asked for (``meta`` here: shapes and dtypes only), never the live tensor, and the live model untouched."""
    model = _lora_model(tiny_config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = merged_state_dict(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the live model was not touched
    live = {t.untyped_storage().data_ptr() for t in after.values()}
    for k, v in {**sd, **adapter_state_dict(model)}.items():
        assert v.device.type == "cpu" and v.untyped_storage().data_ptr() not in live, k
    meta = merged_state_dict(model, device="meta")
    assert {k: (v.device.type, v.dtype, v.shape) for k, v in meta.items()} == {
        k: ("meta", v.dtype, v.shape) for k, v in sd.items()
    }
    assert all(v.device.type == "meta" for v in adapter_state_dict(model, device="meta").values())
    plain = CLIP(**tiny_config.model_info).eval()  # unmodified upstream class
    plain.load_state_dict(sd)  # strict: exactly cn_clip's keys
    images, tokens = _inputs()
    with torch.no_grad():
        a_img, a_txt, _ = model(images, tokens)
        b_img, b_txt, _ = plain(images, tokens)
        base = build_model(tiny_config).eval()
        c_img, _, _ = base(images, tokens)
    torch.testing.assert_close(b_img, a_img, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(b_txt, a_txt, atol=2e-5, rtol=1e-4)
    assert (c_img - a_img).abs().max() > 1e-3  # the adapters really changed the model
    assert has_lora(model)


def test_lora_targets_that_match_nothing_are_refused(tiny_config):
    model = build_model(tiny_config)
    with pytest.raises(ValueError, match="matches no module"):
        apply_tuning(model, tuning_recipe(lora_rank=2, lora_targets=r".*\.nothing_here$"))


def test_freeze_vision_keeps_resnet_batchnorm_in_eval(tmp_path, monkeypatch):
    arch = dict(embed_dim=32, image_resolution=64, vision_layers="[1,1,1,1]", vision_width=16, vision_patch_size=None)
    (tmp_path / "RN-Tiny.json").write_text(json.dumps(arch))
    monkeypatch.setattr("solution.model.registry.EXTRA_CONFIG_DIRS", (tmp_path,))
    model = build_model(ModelConfig("RN-Tiny", "RBT-Tiny", context_length=16))
    recipe = tuning_recipe(freeze_vision=True)
    apply_tuning(model, recipe)
    bns = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    set_train_mode(model, recipe)
    assert model.training and model.bert.training and all(not m.training for m in bns)
    set_train_mode(model, tuning_recipe())
    assert all(m.training for m in bns)


@pytest.mark.parametrize("lora", [False, True])
def test_grad_checkpointing_keeps_every_gradient(tiny_config, lora):
    """Upstream's reentrant checkpoints would drop the adapters' gradients; ours keeps them all."""
    from cn_clip_patch.tuning import grad_checkpointing

    images, tokens = _inputs(4)

    def grads(gc):
        torch.manual_seed(0)
        model = _lora_model(tiny_config) if lora else build_model(tiny_config)
        with grad_checkpointing(model, gc):
            assert model.visual.transformer.grad_checkpointing is gc and model.bert.encoder.grad_checkpointing is gc
            img, txt, scale = model(images, tokens)
            (scale * img @ txt.t()).logsumexp(1).mean().backward()
        assert not model.visual.transformer.grad_checkpointing and not model.bert.encoder.grad_checkpointing
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n, g in plain.items():
        assert ckpt[n] is not None, n
        torch.testing.assert_close(ckpt[n], g, atol=1e-6, rtol=1e-4, msg=n)
