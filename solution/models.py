"""Model registry, building, and the checkpoint contract.

Architectures are JSON files: upstream cn_clip's ``clip/model_configs/*.json`` plus this
project's ``configs/models/*.json`` (tiny test-size ``ViT-Tiny`` and ``RBT-Tiny``), plus any
directory in ``$SOLUTION_MODEL_CONFIGS`` (``os.pathsep``-separated).

Checkpoint contract (``*.pt``, loadable with ``torch.load(weights_only=True)``)::

    {"epoch": int, "step": int, "name": str,
     "state_dict": {"module.<key>": tensor, ...},    # as cn_clip writes them
     "config": ModelConfig as dict,                   # ours; absent in official/cn_clip files
     ...}                                             # optimizer etc. only in resumable ones

Official Chinese-CLIP files (``clip_cn_vit-b-16.pt``) and cn_clip training checkpoints carry no
``config``: their architecture is inferred from the tensor shapes, or given by flags.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .common import SolutionError, atomic_path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def config_dirs() -> list[Path]:
    import cn_clip

    dirs = [Path(cn_clip.__file__).parent / "clip" / "model_configs", PROJECT_ROOT / "configs" / "models"]
    for extra in os.environ.get("SOLUTION_MODEL_CONFIGS", "").split(os.pathsep):
        if extra:
            dirs.append(Path(extra))
    return dirs


def _registry() -> dict[str, Path]:
    reg: dict[str, Path] = {}
    for d in config_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                reg[p.stem] = p
    return reg


def _read_config(name: str) -> dict:
    reg = _registry()
    key = name.replace("/", "-")
    if key not in reg:
        raise SolutionError(f"unknown model name {name!r}; known: {', '.join(sorted(reg))}")
    info = json.loads(reg[key].read_text(encoding="utf-8"))
    if isinstance(info.get("vision_layers"), str):  # RN50 stores "[3, 4, 6, 3]": parse, never eval
        info["vision_layers"] = json.loads(info["vision_layers"])
    return info


def vision_models() -> list[str]:
    return sorted(n for n in _registry() if "vision_width" in _read_config(n))


def text_models() -> list[str]:
    return sorted(n for n in _registry() if "text_hidden_size" in _read_config(n))


def model_info(vision_model: str, text_model: str) -> dict:
    """The keyword arguments of cn_clip's ``CLIP`` for a vision + text pair of names."""
    vis, txt = _read_config(vision_model), _read_config(text_model)
    if "vision_width" not in vis:
        raise SolutionError(f"{vision_model!r} is not a vision model config")
    if "text_hidden_size" not in txt:
        raise SolutionError(f"{text_model!r} is not a text model config")
    return {**vis, **txt}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and use it the way it was trained."""

    vision_model: str
    text_model: str
    context_length: int = 52
    text_prompt: str = ""
    # Tuning recipe: {"mode": "full"|"lora", "freeze_vision": bool, "freeze_text": bool,
    #                 "lora": {...} or None, "merged": bool}
    tuning: dict = field(default_factory=lambda: {"mode": "full"})
    # The full architecture dict, so a checkpoint rebuilds even without the registry file.
    model_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model_info:
            self.model_info = model_info(self.vision_model, self.text_model)

    @property
    def image_resolution(self) -> int:
        return int(self.model_info["image_resolution"])

    @property
    def arch(self) -> str:
        return f"{self.vision_model}@{self.text_model}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A randomly initialised fp32 cn_clip ``CLIP`` (upstream class, unmodified)."""
    from cn_clip.clip.model import CLIP

    model = CLIP(**config.model_info)
    return model.to(device)


# ---------------------------------------------------------------- checkpoints


def read_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict:
    """Load a checkpoint as data (``weights_only=True``); one clear error for anything else.

    ``mmap=True`` maps the tensors from the file instead of reading them all (pages are read on
    use): the soup reads configs and streams weights of many large files without holding them.
    """
    path = Path(path)
    if not path.is_file():
        raise SolutionError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise SolutionError(f"checkpoint {path} is empty")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except Exception as e:  # truncated zip, not a torch file, or code inside
        raise SolutionError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"state_dict": ckpt}  # a bare state dict
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise SolutionError(f"{path} has no 'state_dict': not a CLIP checkpoint")
    return ckpt


def clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's ``module.`` prefix and drop ``bert.pooler`` (unused by CLIP), as cn_clip does."""
    out = {}
    for k, v in sd.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if "bert.pooler" in k:
            continue
        out[k] = v
    return out


def infer_architecture(sd: Mapping[str, torch.Tensor]) -> tuple[str | None, str | None]:
    """Name the registry's vision and text configs whose shapes match a state dict (None if none)."""
    sd = clean_state_dict(sd)
    vision = text = None
    for name in sorted(_registry()):
        info = _read_config(name)
        if vision is None and "vision_width" in info and _vision_matches(info, sd):
            vision = name
        if text is None and "text_hidden_size" in info and _text_matches(info, sd):
            text = name
    return vision, text


def _count_layers(sd: Mapping[str, Any], prefix: str) -> int:
    idx = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return len({i for i in idx if i.isdigit()})


def _vision_matches(info: dict, sd: Mapping[str, torch.Tensor]) -> bool:
    if isinstance(info["vision_layers"], (list, tuple)):  # ResNet
        w = sd.get("visual.conv1.weight")
        return w is not None and "visual.layer1.0.conv1.weight" in sd and w.shape[0] == info["vision_width"] // 2 \
            and [_count_layers(sd, f"visual.layer{i}.") for i in range(1, 5)] == list(info["vision_layers"]) \
            and sd["visual.attnpool.c_proj.weight"].shape[0] == info["embed_dim"]
    w, pos, proj = sd.get("visual.conv1.weight"), sd.get("visual.positional_embedding"), sd.get("visual.proj")
    if w is None or pos is None or proj is None or w.ndim != 4:
        return False
    p, width = info["vision_patch_size"], info["vision_width"]
    return tuple(w.shape) == (width, 3, p, p) and tuple(proj.shape) == (width, info["embed_dim"]) \
        and pos.shape[0] == (info["image_resolution"] // p) ** 2 + 1 \
        and _count_layers(sd, "visual.transformer.resblocks.") == info["vision_layers"]


def _text_matches(info: dict, sd: Mapping[str, torch.Tensor]) -> bool:
    emb = sd.get("bert.embeddings.word_embeddings.weight")
    inter = sd.get("bert.encoder.layer.0.intermediate.dense.weight")
    return emb is not None and inter is not None \
        and tuple(emb.shape) == (info["vocab_size"], info["text_hidden_size"]) \
        and inter.shape[0] == info["text_intermediate_size"] \
        and _count_layers(sd, "bert.encoder.layer.") == info["text_num_hidden_layers"]


def resolve_config(ckpt: Mapping[str, Any] | None, *, vision_model: str | None = None, text_model: str | None = None,
                   context_length: int | None = None, text_prompt: str | None = None, source: str = "checkpoint") -> ModelConfig:
    """The config a checkpoint was trained with; flags fill gaps and override with a warning."""
    stored = dict(ckpt.get("config") or {}) if ckpt else {}
    if ckpt and not stored:
        v, t = infer_architecture(ckpt["state_dict"])
        stored = {k: x for k, x in (("vision_model", v), ("text_model", t)) if x}
    flags = {"vision_model": vision_model, "text_model": text_model, "context_length": context_length,
             "text_prompt": text_prompt}
    for key, val in flags.items():
        if val is None:
            continue
        if key in stored and stored[key] != val:
            log.warning("%s: %s is %r in the checkpoint but %r on the command line; using %r",
                        source, key, stored[key], val, val)
            if key in ("vision_model", "text_model"):
                stored.pop("model_info", None)
        stored[key] = val
    missing = [k for k in ("vision_model", "text_model") if not stored.get(k)]
    if missing:
        raise SolutionError(f"{source}: cannot tell the architecture ({', '.join(missing)}); "
                            "pass --vision-model and --text-model")
    return ModelConfig.from_dict(stored)


def load_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Load a (possibly ``module.``-prefixed) state dict; refuse another architecture by name."""
    from cn_clip.clip.model import resize_pos_embed

    sd = clean_state_dict(sd)
    original = dict(sd)
    own = model.state_dict()
    resize_pos_embed(sd, model)  # upstream's helper: adapts a different image resolution
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd]
    if bad or missing:
        v, t = infer_architecture(original)
        theirs = f"{v or '?'}@{t or '?'}"
        detail = f"{len(bad)} tensors differ in shape (e.g. {bad[0]})" if bad else f"{len(missing)} tensors missing (e.g. {missing[0]})"
        raise SolutionError(f"{source} holds a {theirs} model, not {config.arch}: {detail}")
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        log.warning("%s: ignoring %d unexpected tensors (e.g. %s)", source, len(unexpected), unexpected[0])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k in own})


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", **overrides) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """Build the model a checkpoint describes and load its weights: ``(model, config, checkpoint)``."""
    ckpt = read_checkpoint(path)
    config = resolve_config(ckpt, source=str(path), **overrides)
    model = build_model(config)
    load_weights(model, ckpt["state_dict"], config, str(path))
    return model.to(device), config, ckpt


def state_dict_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes, bytes): the cache key of feature and soup caches."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: ModelConfig, *,
                    epoch: int = 0, step: int = 0, name: str = "", **extra) -> Path:
    """Write a checkpoint atomically in cn_clip's layout (``module.`` keys) plus our ``config``."""
    sd = {(k if k.startswith("module.") else f"module.{k}"): v.detach().cpu() for k, v in state_dict.items()}
    ckpt = {"epoch": int(epoch), "step": int(step), "name": name, "state_dict": sd, "config": config.to_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)
