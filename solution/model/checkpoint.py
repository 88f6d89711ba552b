"""The checkpoint contract: the one reader (:func:`read_checkpoint`) and writer (:func:`save_checkpoint`).

A checkpoint (``*.pt``, loadable with ``torch.load(weights_only=True)``)::

    {"epoch": int, "step": int, "name": str,
     "state_dict": {"module.<key>": tensor, ...},    # as cn_clip writes them
     "config": ModelConfig as dict,                   # ours; absent in official/cn_clip files
     ...}                                             # optimizer etc. only in resumable ones

A bare state dict (a file holding only tensors) reads as ``{"state_dict": it}``. Official
Chinese-CLIP files (``clip_cn_vit-b-16.pt``) and cn_clip training checkpoints carry no ``config``:
:func:`resolve_config` infers their architecture from the tensor shapes
(:func:`infer_architecture`), or takes it from flags, and checks the names against the registry.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from solution.common import SolutionError, atomic_path

from .registry import ModelConfig, known_configs, model_info, read_config, text_models, vision_models

log = logging.getLogger(__name__)


def read_checkpoint(path: str | os.PathLike, *, mmap: bool = True) -> dict:
    """Load a checkpoint as data (``weights_only=True``, on the CPU); one clear error for anything else.

    ``mmap`` (the default) maps the tensors of a zip-format file (every ``torch.save`` since 1.6)
    instead of reading them all: pages are read on use and belong to the page cache, so a start
    checkpoint copied into a model (or onto a GPU) and then dropped never holds a second copy in
    the process, and the soup streams the weights of many large files. The mapping is private
    (copy-on-write): writing to a loaded tensor never changes the file. A legacy (pre-zip) file
    cannot be mapped and is read whole.
    """
    path = Path(path)
    if not path.is_file():
        raise SolutionError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise SolutionError(f"checkpoint {path} is empty")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except Exception as e:  # truncated zip, not a torch file, or code inside
        raise SolutionError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if (
        isinstance(ckpt, dict)
        and "state_dict" not in ckpt
        and ckpt
        and all(isinstance(v, torch.Tensor) for v in ckpt.values())
    ):
        ckpt = {"state_dict": ckpt}  # a bare state dict
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise SolutionError(f"{path} has no 'state_dict': not a CLIP checkpoint")
    return ckpt


def _is_zip(path: Path) -> bool:
    """Whether ``path`` is a zip-format torch file (what ``torch.load(mmap=True)`` can map)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig,
    *,
    epoch: int = 0,
    step: int = 0,
    name: str = "",
    **extra,
) -> Path:
    """Write a checkpoint atomically in cn_clip's layout (``module.`` keys) plus our ``config``."""
    sd = {(k if k.startswith("module.") else f"module.{k}"): v.detach().cpu() for k, v in state_dict.items()}
    ckpt = {"epoch": int(epoch), "step": int(step), "name": name, "state_dict": sd, "config": config.to_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)


def clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's ``module.`` prefix and drop ``bert.pooler`` (unused by CLIP), as cn_clip does."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if "bert.pooler" in k:
            continue
        out[k] = v
    return out


def state_dict_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes, bytes): the cache key of feature and soup caches."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# ---------------------------------------------------------------- which architecture


def infer_architecture(sd: Mapping[str, torch.Tensor]) -> tuple[str | None, str | None]:
    """Name the registry's vision and text configs whose shapes match a state dict (None if none)."""
    sd = clean_state_dict(sd)
    vision = text = None
    for name in sorted(known_configs()):
        info = read_config(name)
        if vision is None and "vision_width" in info and _vision_matches(info, sd):
            vision = name
        if text is None and "text_hidden_size" in info and _text_matches(info, sd):
            text = name
    return vision, text


def _count_layers(sd: Mapping[str, Any], prefix: str) -> int:
    idx = {k[len(prefix) :].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return len({i for i in idx if i.isdigit()})


def _vision_matches(info: dict, sd: Mapping[str, torch.Tensor]) -> bool:
    if isinstance(info["vision_layers"], (list, tuple)):  # ResNet
        w, proj = sd.get("visual.conv1.weight"), sd.get("visual.attnpool.c_proj.weight")
        return (
            w is not None
            and proj is not None
            and "visual.layer1.0.conv1.weight" in sd
            and w.shape[0] == info["vision_width"] // 2
            and proj.shape[0] == info["embed_dim"]
            and [_count_layers(sd, f"visual.layer{i}.") for i in range(1, 5)] == list(info["vision_layers"])
        )
    w, pos, proj = sd.get("visual.conv1.weight"), sd.get("visual.positional_embedding"), sd.get("visual.proj")
    if w is None or pos is None or proj is None or w.ndim != 4:
        return False
    p, width = info["vision_patch_size"], info["vision_width"]
    return (
        tuple(w.shape) == (width, 3, p, p)
        and tuple(proj.shape) == (width, info["embed_dim"])
        and pos.shape[0] == (info["image_resolution"] // p) ** 2 + 1
        and _count_layers(sd, "visual.transformer.resblocks.") == info["vision_layers"]
    )


def _text_matches(info: dict, sd: Mapping[str, torch.Tensor]) -> bool:
    emb = sd.get("bert.embeddings.word_embeddings.weight")
    inter = sd.get("bert.encoder.layer.0.intermediate.dense.weight")
    return (
        emb is not None
        and inter is not None
        and tuple(emb.shape) == (info["vocab_size"], info["text_hidden_size"])
        and inter.shape[0] == info["text_intermediate_size"]
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
    """The config a checkpoint was trained with; flags fill gaps and override with a warning.

    The architecture names must be in the registry (vision and text configs respectively), and a
    stored ``model_info`` must hold every key of the registry's; one that differs from the registry's
    values is used as stored (it is what the weights were trained as), with a warning naming the keys.
    """
    stored = (ckpt.get("config") or {}) if ckpt else {}
    if not isinstance(stored, Mapping):
        raise SolutionError(
            f"{source}: its 'config' is a {type(stored).__name__}, not a mapping: not one of our checkpoints"
        )
    stored = dict(stored)
    if ckpt and not stored:
        v, t = infer_architecture(ckpt["state_dict"])
        stored = {k: x for k, x in (("vision_model", v), ("text_model", t)) if x}
    flags = {
        "vision_model": vision_model,
        "text_model": text_model,
        "context_length": context_length,
        "text_prompt": text_prompt,
    }
    for key, val in flags.items():
        if val is None:
            continue
        if key in stored and stored[key] != val:
            log.warning(
                "%s: %s is %r in the checkpoint but %r on the command line; using %r",
                source,
                key,
                stored[key],
                val,
                val,
            )
            if key in ("vision_model", "text_model"):
                stored.pop("model_info", None)
        stored[key] = val
    missing = [k for k in ("vision_model", "text_model") if not stored.get(k)]
    if missing:
        raise SolutionError(
            f"{source}: cannot tell the architecture ({', '.join(missing)}); pass --vision-model and --text-model"
        )
    flagged = {k for k in ("vision_model", "text_model") if flags[k] is not None}
    _check_names(stored, source, flagged)
    _check_model_info(stored, source)
    return ModelConfig.from_dict(stored)


def _check_names(stored: dict, source: str, flagged: set) -> None:
    """Architecture names known to the registry, of the right kind."""
    reg = known_configs()
    for key, kind, marker, flag in (
        ("vision_model", "vision", "vision_width", "--vision-model"),
        ("text_model", "text", "text_hidden_size", "--text-model"),
    ):
        name = stored[key]
        if not isinstance(name, str) or name.replace("/", "-") not in reg:
            known = ", ".join(vision_models() if kind == "vision" else text_models())
            if key in flagged:
                raise SolutionError(f"{flag}: unknown model name {name!r}; known {kind} models: {known}")
            raise SolutionError(
                f"{source}: its config names an unknown {kind} architecture {name!r} (known: {known}); "
                f"add its JSON to $SOLUTION_MODEL_CONFIGS or pass {flag}"
            )
        if marker not in read_config(name):
            raise SolutionError(
                f"{flag}: {name!r} is not a {kind} model config"
                if key in flagged
                else f"{source}: its config names {name!r} as the {kind} architecture, but it is not a "
                f"{kind} model config"
            )


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
        raise SolutionError(
            f"{source}: its config's model_info lacks {', '.join(lacking[:5])}"
            f"{f' (+{len(lacking) - 5} more)' if len(lacking) > 5 else ''}"
        )
    differ = [k for k in ref if info[k] != ref[k]]
    if differ:
        log.warning(
            "%s: its %s@%s differs from the registry's in %s; building it as the checkpoint records",
            source,
            stored["vision_model"],
            stored["text_model"],
            ", ".join(f"{k} ({info[k]!r}, registry {ref[k]!r})" for k in differ[:5]),
        )
