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

Every consumer (training, features, soup) checks a checkpoint the same way, each failure one
:class:`SolutionError` line naming the file: :func:`resolve_config` (architecture names in the
registry, of the right kind; a complete ``model_info``), :func:`check_shapes` (every tensor of the
model built from that config, in its shape; :func:`load_weights` runs it) and :func:`check_finite`
(no NaN/Inf).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from solution.common import SolutionError, atomic_path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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


def model_template(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of ``config``'s model (built on the meta device: no memory)."""
    return dict(_template(json.dumps(config.model_info, sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _template(info: str) -> tuple:
    from cn_clip.clip.model import CLIP

    with torch.device("meta"):
        model = CLIP(**json.loads(info))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


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
        w, proj = sd.get("visual.conv1.weight"), sd.get("visual.attnpool.c_proj.weight")
        return w is not None and proj is not None and "visual.layer1.0.conv1.weight" in sd \
            and w.shape[0] == info["vision_width"] // 2 and proj.shape[0] == info["embed_dim"] \
            and [_count_layers(sd, f"visual.layer{i}.") for i in range(1, 5)] == list(info["vision_layers"])
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
    """The config a checkpoint was trained with; flags fill gaps and override with a warning.

    The architecture names must be in the registry (vision and text configs respectively), and a
    stored ``model_info`` must hold every key of the registry's; one that differs from the registry's
    values is used as stored (it is what the weights were trained as), with a warning naming the keys.
    """
    stored = (ckpt.get("config") or {}) if ckpt else {}
    if not isinstance(stored, Mapping):
        raise SolutionError(f"{source}: its 'config' is a {type(stored).__name__}, not a mapping: "
                            "not one of our checkpoints")
    stored = dict(stored)
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
    _check_names(stored, source, {k for k in ("vision_model", "text_model") if flags[k] is not None})
    return ModelConfig.from_dict(stored)


def _check_names(stored: dict, source: str, flagged: set) -> None:
    """Architecture names known to the registry, of the right kind; ``model_info`` complete."""
    reg = _registry()
    for key, kind, marker, flag in (("vision_model", "vision", "vision_width", "--vision-model"),
                                    ("text_model", "text", "text_hidden_size", "--text-model")):
        name = stored[key]
        if not isinstance(name, str) or name.replace("/", "-") not in reg:
            known = ", ".join(vision_models() if kind == "vision" else text_models())
            if key in flagged:
                raise SolutionError(f"{flag}: unknown model name {name!r}; known {kind} models: {known}")
            raise SolutionError(f"{source}: its config names an unknown {kind} architecture {name!r} (known: {known}); "
                                f"add its JSON to $SOLUTION_MODEL_CONFIGS or pass {flag}")
        if marker not in _read_config(name):
            raise SolutionError(f"{flag}: {name!r} is not a {kind} model config" if key in flagged else
                                f"{source}: its config names {name!r} as the {kind} architecture, but it is not a "
                                f"{kind} model config")
    info = stored.get("model_info")
    if not info:
        return
    if not isinstance(info, Mapping):
        raise SolutionError(f"{source}: its config's model_info is a {type(info).__name__}, not a mapping")
    ref = model_info(stored["vision_model"], stored["text_model"])
    lacking = [k for k in ref if k not in info]
    if lacking:
        raise SolutionError(f"{source}: its config's model_info lacks {', '.join(lacking[:5])}"
                            f"{f' (+{len(lacking) - 5} more)' if len(lacking) > 5 else ''}")
    differ = [k for k in ref if info[k] != ref[k]]
    if differ:
        log.warning("%s: its %s@%s differs from the registry's in %s; building it as the checkpoint records",
                    source, stored["vision_model"], stored["text_model"],
                    ", ".join(f"{k} ({info[k]!r}, registry {ref[k]!r})" for k in differ[:5]))


def _count(names) -> str:
    return f"{len(names)} tensor{'' if len(names) == 1 else 's'}"


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def check_shapes(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], config: ModelConfig, source: str,
                 original: Mapping[str, torch.Tensor] | None = None) -> None:
    """Refuse a (clean) state dict whose tensors are missing from or differ in shape with ``expected``.

    One line naming the file, the architecture its config names, the one its shapes look like
    (from ``original``, the weights as stored, when given) and the first mismatching tensors.
    """
    bad = [k for k, shape in expected.items() if k in sd and tuple(sd[k].shape) != tuple(shape)]
    missing = [k for k in expected if k not in sd]
    if not bad and not missing:
        return
    v, t = infer_architecture(original if original is not None else sd)
    theirs = f"{v or '?'}@{t or '?'}"
    parts = []
    if bad:
        shown = ", ".join(f"{k} {_shape(sd[k].shape)} vs {_shape(expected[k])}" for k in bad[:3])
        verb = "differs" if len(bad) == 1 else "differ"
        parts.append(f"{_count(bad)} {verb} in shape ({shown}{', ...' if len(bad) > 3 else ''})")
    if missing:
        parts.append(f"{_count(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    head = f"{source} holds a {theirs} model, not {config.arch}" if theirs != config.arch \
        else f"{source} does not fit {config.arch}"
    raise SolutionError(f"{head}: {'; '.join(parts)}")


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf: one line naming the file and the first such tensors."""
    bad = [k for k, t in sd.items() if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SolutionError(f"{source} has non-finite weights (NaN or Inf) in {_count(bad)}: "
                            f"{', '.join(bad[:3])}{more}; a diverged run? use an earlier checkpoint")


def _resizable_positions(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple]) -> bool:
    """Whether upstream's ``resize_pos_embed`` can adapt the ViT position grid (a square grid of our width)."""
    key = "visual.positional_embedding"
    pos, want = sd.get(key), expected.get(key)
    if pos is None or want is None or pos.ndim != 2 or len(want) != 2 or pos.shape[1] != want[1] \
            or pos.shape[0] == want[0]:
        return False
    side = int(round((pos.shape[0] - 1) ** 0.5))
    return pos.shape[0] > 1 and side * side == pos.shape[0] - 1


def load_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Load a (possibly ``module.``-prefixed) state dict into ``model`` (built from ``config``).

    Refuses (:class:`SolutionError`, one line naming ``source``) tensors missing or of other shapes
    than the model's (:func:`check_shapes`; a ViT position grid of another resolution is resized
    as upstream does) and NaN/Inf weights (:func:`check_finite`).
    """
    from cn_clip.clip.model import resize_pos_embed

    sd = clean_state_dict(sd)
    original = dict(sd)
    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    if _resizable_positions(sd, expected):
        resize_pos_embed(sd, model)  # upstream's helper: adapts a different image resolution
    check_shapes(sd, expected, config, source, original)
    check_finite({k: v for k, v in original.items() if k in own}, source)
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        log.warning("%s: ignoring %d unexpected tensors (e.g. %s)", source, len(unexpected), unexpected[0])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k in own})


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", **overrides) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """Build the model a checkpoint describes and load its weights: ``(model, config, checkpoint)``.

    Every check of :func:`resolve_config` (names against the registry) and :func:`load_weights`
    (shapes against the built model, finite weights) applies.
    """
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
