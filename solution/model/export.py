"""A cn_clip checkpoint as a 🤗 transformers ``ChineseCLIPModel`` folder or as two ONNX graphs.

``hf``: ``model.safetensors`` + ``config.json`` (:class:`ChineseCLIPConfig`; the toolkit's prompt and
context length under ``cn_clip_*`` keys) + a processor: cn_clip's vocabulary with its text
normalisation (curly quotes to ``"``, lower case) and its eval transform (square bicubic resize, CLIP
mean/std, no crop). ``onnx``: ``image.onnx`` (``pixel_values [batch, 3, R, R]``) and ``text.onnx``
(``input_ids [batch, length]``, padding ``0`` masked as cn_clip does), both giving L2-normalised
features like :func:`solution.retrieval.encode.encode_images` / ``encode_texts``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from solution.common import SolutionError, check_output, disk_full_as_error
from solution.data.datasets import eval_transform

from .load import load_model
from .registry import ModelConfig

log = logging.getLogger(__name__)

FORMATS = ("hf", "onnx")
EXTRAS = {"hf": ("transformers", "safetensors"), "onnx": ("onnx",)}
INSTALL = 'pip install -e ".[export]"'
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


def require(fmt: str) -> None:
    """Refuse (one line) when the optional packages ``fmt`` needs are missing."""
    for name in EXTRAS[fmt]:
        try:
            __import__(name)
        except ImportError:
            raise SolutionError(f"--format {fmt} needs the package {name!r}: {INSTALL}") from None


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
            name = key.removeprefix("visual.")
            for old, new in _VISION_NAMES:
                name = name.replace(old, new)
            if ".attn.in_proj_" in name:  # one packed q/k/v projection -> three
                head, kind = name.split(".attn.in_proj_")
                for part, tensor in zip("qkv", value.chunk(3)):
                    out[f"vision_model.{head}.self_attn.{part}_proj.{kind}"] = tensor
            else:
                out["vision_model." + name] = value
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def hf_config(config: ModelConfig, logit_scale: float):
    """The :class:`ChineseCLIPConfig` of ``config``'s architecture (a ViT vision tower)."""
    from transformers import ChineseCLIPConfig

    from cn_clip_patch.prompt import PAD_ID

    info = config.model_info
    width = info["vision_width"]
    text = {
        "vocab_size": info["vocab_size"],
        "hidden_size": info["text_hidden_size"],
        "num_hidden_layers": info["text_num_hidden_layers"],
        "num_attention_heads": info["text_num_attention_heads"],
        "intermediate_size": info["text_intermediate_size"],
        "hidden_act": info["text_hidden_act"],
        "hidden_dropout_prob": info["text_hidden_dropout_prob"],
        "attention_probs_dropout_prob": info["text_attention_probs_dropout_prob"],
        "max_position_embeddings": info["text_max_position_embeddings"],
        "type_vocab_size": info["text_type_vocab_size"],
        "initializer_range": info["text_initializer_range"],
        "layer_norm_eps": 1e-12,
        "pad_token_id": PAD_ID,
    }
    vision = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "projection_dim": info["embed_dim"],
        "num_hidden_layers": info["vision_layers"],
        "num_attention_heads": width // info.get("vision_head_width", 64),
        "image_size": info["image_resolution"],
        "patch_size": info["vision_patch_size"],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    out = ChineseCLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=info["embed_dim"],
        logit_scale_init_value=logit_scale,
        cn_clip_text_prompt=config.text_prompt,
        cn_clip_context_length=config.context_length,
    )
    out.architectures = ["ChineseCLIPModel"]
    return out


def hf_processor(config: ModelConfig):
    """A ``ChineseCLIPProcessor`` that tokenises like ``cn_clip_patch.prompt.tokenize`` (prompt not included)
    and preprocesses images like :func:`solution.data.datasets.eval_transform`."""
    import cn_clip.clip
    from tokenizers import normalizers
    from torchvision.transforms import Normalize
    from transformers import BertTokenizer, ChineseCLIPImageProcessor, ChineseCLIPProcessor, PreTrainedTokenizerFast

    vocab = Path(cn_clip.clip.__file__).parent / "vocab.txt"
    backend = BertTokenizer(vocab=str(vocab), do_lower_case=True).backend_tokenizer
    backend.model.max_input_chars_per_word = 200  # cn_clip's WordpieceTokenizer
    quotes = [normalizers.Replace("“", '"'), normalizers.Replace("”", '"')]  # cn_clip's _preprocess_text
    backend.normalizer = normalizers.Sequence([*quotes, backend.normalizer])
    specials = {f"{k}_token": f"[{k.upper()}]" for k in ("unk", "sep", "pad", "cls", "mask")}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=config.context_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        **specials,
    )
    size = {"height": config.image_resolution, "width": config.image_resolution}
    norm = next(t for t in eval_transform(config.image_resolution).transforms if isinstance(t, Normalize))
    images = ChineseCLIPImageProcessor(
        size=size, crop_size=size, do_center_crop=False, image_mean=list(norm.mean), image_std=list(norm.std)
    )
    return ChineseCLIPProcessor(image_processor=images, tokenizer=tokenizer)


def write_hf(model: torch.nn.Module, config: ModelConfig, folder: Path) -> None:
    from safetensors.torch import save_file

    sd = hf_state_dict(model.state_dict())
    hf = hf_config(config, float(sd["logit_scale"]))
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf.save_pretrained(folder)
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


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed onto it when the block succeeds; ``out`` must be absent or empty."""
    if out.is_dir() and any(out.iterdir()):
        raise SolutionError(f"output folder {out} is not empty; choose a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors make them private
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, output: str | os.PathLike) -> ModelConfig:
    """Write ``checkpoint`` (ours or an official cn_clip file) to the folder ``output`` as ``fmt`` (:data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise SolutionError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    require(fmt)
    out = check_output(output, inputs=[checkpoint], what="output folder", is_dir=True)
    model, config, _ = load_model(checkpoint, device="cpu", attn_impl="upstream")
    if isinstance(config.model_info["vision_layers"], (list, tuple)):
        raise SolutionError(f"{checkpoint} has a ResNet vision tower ({config.vision_model}); only ViT models export")
    model.eval()
    with staged_folder(out) as tmp, disk_full_as_error(tmp), torch.no_grad():
        (write_hf if fmt == "hf" else write_onnx)(model, config, tmp)
    log.info("wrote %s (%s) from %s", out, fmt, checkpoint)
    return config
