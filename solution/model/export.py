"""A cn_clip checkpoint as a 🤗 transformers ``ChineseCLIPModel`` folder (weights, config with the toolkit's prompt
and context length, a processor tokenising and preprocessing like cn_clip) or as ``image.onnx`` + ``text.onnx``
(``pixel_values`` / ``input_ids``, padding ``0`` masked) giving the toolkit's L2-normalised features."""

import importlib.util
import logging
import os
import warnings
from pathlib import Path

import torch

from solution.common import SolutionError, atomic_path, check_output
from solution.data.datasets import MEAN, STD

from .load import load_model
from .registry import ModelConfig

log = logging.getLogger(__name__)

EXTRAS = {"hf": ("transformers", "safetensors"), "onnx": ("onnx",)}
FORMATS = tuple(EXTRAS)
# cn_clip's ViT names -> transformers' (applied in order to the part after ``visual.``)
_VISION_NAMES = (
    ("class_embedding", "embeddings.class_embedding"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("conv1.", "embeddings.patch_embedding."),
    ("ln_pre.", "pre_layrnorm."),
    ("ln_post.", "post_layernorm."),
    ("transformer.resblocks.", "encoder.layers."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)


def hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cn_clip ``CLIP`` weights (ViT vision tower, clean keys) under ``ChineseCLIPModel``'s names."""
    out = {
        "logit_scale": sd["logit_scale"],
        "text_projection.weight": sd["text_projection"].t(),
        "visual_projection.weight": sd["visual.proj"].t(),
    }
    for key, value in sd.items():
        if key.startswith("bert."):
            out["text_model." + key.removeprefix("bert.")] = value
        elif key.startswith("visual.") and key != "visual.proj":
            name = "vision_model." + key.removeprefix("visual.")
            for old, new in _VISION_NAMES:
                name = name.replace(old, new)
            if ".attn.in_proj_" in name:  # one packed q/k/v projection -> three
                head, kind = name.split(".attn.in_proj_")
                out.update({f"{head}.self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", value.chunk(3))})
            else:
                out[name] = value
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def hf_config(config: ModelConfig, logit_scale: float):
    """The ``ChineseCLIPConfig`` of ``config``'s architecture (a ViT vision tower; activations, layer-norm epsilons
    and the padding id are transformers' defaults, as cn_clip's)."""
    from transformers import ChineseCLIPConfig

    info = config.model_info
    width = info["vision_width"]
    vision = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "projection_dim": info["embed_dim"],
        "num_hidden_layers": info["vision_layers"],
        "num_attention_heads": width // info.get("vision_head_width", 64),
        "image_size": info["image_resolution"],
        "patch_size": info["vision_patch_size"],
    }
    return ChineseCLIPConfig(
        text_config={k.removeprefix("text_"): v for k, v in info.items() if k.startswith("text_") or k == "vocab_size"},
        vision_config=vision,
        projection_dim=info["embed_dim"],
        logit_scale_init_value=logit_scale,
        cn_clip_text_prompt=config.text_prompt,
        cn_clip_context_length=config.context_length,
        architectures=["ChineseCLIPModel"],
    )


def hf_processor(config: ModelConfig):
    """A ``ChineseCLIPProcessor`` that tokenises like ``cn_clip_patch.prompt.tokenize`` (prompt not included) and
    preprocesses images like :func:`solution.data.datasets.eval_transform` (square bicubic resize, no crop)."""
    import cn_clip.clip
    from tokenizers import normalizers
    from transformers import BertTokenizer, ChineseCLIPImageProcessor, ChineseCLIPProcessor, PreTrainedTokenizerFast

    vocab = Path(cn_clip.clip.__file__).parent / "vocab.txt"
    backend = BertTokenizer(vocab=str(vocab), do_lower_case=True).backend_tokenizer
    backend.model.max_input_chars_per_word = 200  # cn_clip's WordpieceTokenizer
    quotes = [normalizers.Replace("“", '"'), normalizers.Replace("”", '"')]  # cn_clip's _preprocess_text
    backend.normalizer = normalizers.Sequence([*quotes, backend.normalizer])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=config.context_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        **{f"{k}_token": f"[{k.upper()}]" for k in ("unk", "sep", "pad", "cls", "mask")},
    )
    size = {"height": config.image_resolution, "width": config.image_resolution}
    images = ChineseCLIPImageProcessor(
        size=size, crop_size=size, do_center_crop=False, image_mean=list(MEAN), image_std=list(STD)
    )
    return ChineseCLIPProcessor(image_processor=images, tokenizer=tokenizer)


def write_hf(model: torch.nn.Module, config: ModelConfig, folder: Path) -> None:
    from safetensors.torch import save_file

    sd = hf_state_dict(model.state_dict())
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config(config, float(sd["logit_scale"])).save_pretrained(folder)
    hf_processor(config).save_pretrained(folder)


class _Features(torch.nn.Module):
    """One tower of a cn_clip model and L2 normalisation: what the toolkit's encoders return."""

    def __init__(self, model: torch.nn.Module, tower: str):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.encode_image(x) if self.tower == "image" else self.model.encode_text(x)
        return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def write_onnx(model: torch.nn.Module, config: ModelConfig, folder: Path) -> None:
    r = config.image_resolution
    graphs = {
        "image": (torch.zeros(2, 3, r, r), "pixel_values", {0: "batch"}),
        "text": (torch.full((2, min(8, config.context_length)), 101), "input_ids", {0: "batch", 1: "length"}),
    }
    for tower, (example, name, axes) in graphs.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter: traces cleanly
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # MHA's shape asserts: constants
            torch.onnx.export(
                _Features(model, tower).eval(),
                (example,),
                str(folder / f"{tower}.onnx"),
                input_names=[name],
                output_names=[f"{tower}_features"],
                dynamic_axes={name: axes, f"{tower}_features": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, output: str | os.PathLike) -> ModelConfig:
    """Write ``checkpoint`` (ours or an official cn_clip file) to the folder ``output`` as ``fmt`` (:data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise SolutionError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    for name in EXTRAS[fmt]:
        if importlib.util.find_spec(name) is None:
            raise SolutionError(f'--format {fmt} needs the package {name!r}: pip install -e ".[export]"')
    out = check_output(output, inputs=[checkpoint], what="output folder", is_dir=True)
    if out.is_dir() and any(out.iterdir()):  # before the checkpoint is read (large ones take a while)
        raise SolutionError(f"output folder {out} is not empty; choose a new one")
    model, config, _ = load_model(checkpoint, device="cpu", attn_impl="upstream")
    if isinstance(config.model_info["vision_layers"], (list, tuple)):
        raise SolutionError(f"{checkpoint} has a ResNet vision tower ({config.vision_model}); only ViT models export")
    with atomic_path(out, folder=True) as tmp, torch.no_grad():
        (write_hf if fmt == "hf" else write_onnx)(model.eval(), config, tmp)
    log.info("wrote %s (%s) from %s", out, fmt, checkpoint)
    return config
