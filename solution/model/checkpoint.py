"""The checkpoint contract: a dict loadable with ``torch.load(weights_only=True)`` holding ``state_dict`` (``module.``
keys, as cn_clip writes them), ``epoch``, ``step``, ``name`` and ours a ``config`` (a :class:`ModelConfig` dict); a
bare state dict reads as ``{"state_dict": it}``, a file without ``config`` has its architecture inferred."""

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from solution.common import SolutionError, atomic_path

from .registry import MARKERS, MODEL_CONFIGS_ENV, ModelConfig, known_configs, model_info, models, read_config

log = logging.getLogger(__name__)


def read_checkpoint(path: str | os.PathLike, *, mmap: bool = True) -> dict:
    """A checkpoint as data on the CPU (a zip file's tensors mapped copy-on-write with ``mmap``); one clear error
    for anything else."""
    path = Path(path)
    if not path.is_file():
        raise SolutionError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise SolutionError(f"checkpoint {path} is empty")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except Exception as e:  # truncated zip, not a torch file, or code inside
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise SolutionError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first})") from None
    if isinstance(ckpt, dict) and ckpt and "state_dict" not in ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        ckpt = {"state_dict": ckpt}
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise SolutionError(f"{path} has no 'state_dict': not a CLIP checkpoint")
    return ckpt


def save_checkpoint(path, state_dict: Mapping, config: ModelConfig, *, epoch=0, step=0, name="", **extra) -> Path:
    """Write a checkpoint atomically in cn_clip's layout (``module.`` keys) plus our ``config``."""
    sd = {(k if k.startswith("module.") else f"module.{k}"): v.detach().cpu() for k, v in state_dict.items()}
    ckpt = {"epoch": int(epoch), "step": int(step), "name": name, "state_dict": sd, "config": config.to_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)


def clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's ``module.`` prefix and drop ``bert.pooler`` (unused by CLIP), as cn_clip does."""
    return {k.removeprefix("module."): v for k, v in sd.items() if "bert.pooler" not in k}


def refuse_unmerged_lora(config: ModelConfig, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Soups and ensembles take full weights only: a LoRA run's merged checkpoint, never its adapters."""
    tuning = config.tuning or {}
    if (tuning.get("mode") == "lora" and not tuning.get("merged")) or any(
        "lora_" in k or ".base_layer." in k for k in sd
    ):
        raise SolutionError(f"{source} holds unmerged LoRA weights: use the merged checkpoint the trainer saves")


def state_dict_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def fingerprint(checkpoint: str | os.PathLike | Mapping) -> str:
    """The identity of a checkpoint's weights (a path or a checkpoint read already), whatever else it holds."""
    ckpt = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    return state_dict_digest(clean_state_dict(ckpt["state_dict"]))


def infer_architecture(sd: Mapping[str, torch.Tensor]) -> tuple[str | None, str | None]:
    """Name the registry's vision and text configs whose shapes match a state dict (None if none)."""
    sd = clean_state_dict(sd)
    vision = text = None
    for name in sorted(known_configs()):
        info = read_config(name)
        if vision is None and MARKERS["vision"] in info and _vision_matches(info, sd):
            vision = name
        if text is None and MARKERS["text"] in info and _text_matches(info, sd):
            text = name
    return vision, text


def _count_layers(sd: Mapping[str, Any], prefix: str) -> int:
    return len({s for k in sd if k.startswith(prefix) and (s := k[len(prefix) :].split(".", 1)[0]).isdigit()})


def _dims(sd: Mapping[str, torch.Tensor], key: str) -> tuple:
    return tuple(sd[key].shape) if key in sd else ()


def _vision_matches(info: dict, sd: Mapping[str, torch.Tensor]) -> bool:
    width, embed = info["vision_width"], info["embed_dim"]
    if isinstance(info["vision_layers"], (list, tuple)):  # ResNet
        return (
            _dims(sd, "visual.conv1.weight")[:1] == (width // 2,)
            and _dims(sd, "visual.attnpool.c_proj.weight")[:1] == (embed,)
            and [_count_layers(sd, f"visual.layer{i}.") for i in range(1, 5)] == list(info["vision_layers"])
        )
    p = info["vision_patch_size"]
    return (
        _dims(sd, "visual.conv1.weight") == (width, 3, p, p)
        and _dims(sd, "visual.proj") == (width, embed)
        and _dims(sd, "visual.positional_embedding")[:1] == ((info["image_resolution"] // p) ** 2 + 1,)
        and _count_layers(sd, "visual.transformer.resblocks.") == info["vision_layers"]
    )


def _text_matches(info: dict, sd: Mapping[str, torch.Tensor]) -> bool:
    return (
        _dims(sd, "bert.embeddings.word_embeddings.weight") == (info["vocab_size"], info["text_hidden_size"])
        and _dims(sd, "bert.encoder.layer.0.intermediate.dense.weight")[:1] == (info["text_intermediate_size"],)
        and _count_layers(sd, "bert.encoder.layer.") == info["text_num_hidden_layers"]
    )


def resolve_config(
    ckpt: Mapping[str, Any] | None,
    *,
    vision_model: str | None = None,
    text_model: str | None = None,
    context_length: int | None = None,
    text_prompt: str | None = None,
    source: str = "checkpoint",
) -> ModelConfig:
    """The config a checkpoint was trained with; flags fill gaps and override it with a warning. A stored
    ``model_info`` (what the weights were trained as) must hold every key of the registry's and is used as stored."""
    stored = (ckpt.get("config") or {}) if ckpt else {}
    if not isinstance(stored, Mapping):
        raise SolutionError(f"{source}: its 'config' is a {type(stored).__name__}, not a mapping (not one of ours)")
    stored = dict(stored)
    if ckpt and not stored:
        stored = {k: x for k, x in zip(("vision_model", "text_model"), infer_architecture(ckpt["state_dict"])) if x}
    given = {"vision_model": vision_model, "text_model": text_model}
    for key, val in {**given, "context_length": context_length, "text_prompt": text_prompt}.items():
        if val is None:
            continue
        if key in stored and stored[key] != val:
            log.warning(f"{source}: {key} is {stored[key]!r} in the checkpoint but {val!r} on the command line")
            if key in given:
                stored.pop("model_info", None)
        stored[key] = val
    missing = ", ".join(k for k in given if not stored.get(k))
    if missing:
        raise SolutionError(f"{source}: cannot tell the architecture ({missing}); pass --vision-model and --text-model")
    for kind, marker in MARKERS.items():
        key = f"{kind}_model"
        name, flag, flagged = stored[key], f"--{kind}-model", given[key] is not None
        if not isinstance(name, str) or name.replace("/", "-") not in known_configs():
            known = ", ".join(models(kind))
            if flagged:
                raise SolutionError(f"{flag}: unknown model name {name!r}; known {kind} models: {known}")
            raise SolutionError(
                f"{source}: its config names an unknown {kind} architecture {name!r} (known: {known}); "
                f"add its JSON to ${MODEL_CONFIGS_ENV} or pass {flag}"
            )
        if marker not in read_config(name):
            if flagged:
                raise SolutionError(f"{flag}: {name!r} is not a {kind} model config")
            raise SolutionError(
                f"{source}: its config names {name!r} as the {kind} architecture, but it is not a {kind} model config"
            )
    _check_model_info(stored, source)
    return ModelConfig.from_dict(stored)


def _check_model_info(stored: dict, source: str) -> None:
    """A stored ``model_info`` holds every key of the registry's; a differing value is only a warning."""
    info = stored.get("model_info")
    if not info:
        return
    if not isinstance(info, Mapping):
        raise SolutionError(f"{source}: its config's model_info is a {type(info).__name__}, not a mapping")
    ref = model_info(stored["vision_model"], stored["text_model"])
    lacking = [k for k in ref if k not in info]
    if lacking:
        more = f" (+{len(lacking) - 5} more)" if len(lacking) > 5 else ""
        raise SolutionError(f"{source}: its config's model_info lacks {', '.join(lacking[:5])}{more}")
    differ = ", ".join([f"{k} ({info[k]!r}, registry {ref[k]!r})" for k in ref if info[k] != ref[k]][:5])
    if differ:
        arch = f"{stored['vision_model']}@{stored['text_model']}"
        log.warning(f"{source}: its {arch} differs from the registry's in {differ}; built as the checkpoint records")
