"""The architecture registry and :class:`ModelConfig`.

Architectures are JSON files: upstream cn_clip's ``clip/model_configs/*.json`` plus this
project's ``configs/models/*.json`` (tiny test-size ``ViT-Tiny`` and ``RBT-Tiny``), plus any
directory in ``$SOLUTION_MODEL_CONFIGS`` (``os.pathsep``-separated); a later directory's file
wins over an earlier one of the same name. A vision config holds ``vision_width``, a text config
``text_hidden_size``; :func:`model_info` merges one of each into the keyword arguments of
cn_clip's ``CLIP``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solution.common import SolutionError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def config_dirs() -> list[Path]:
    import cn_clip

    dirs = [Path(cn_clip.__file__).parent / "clip" / "model_configs", PROJECT_ROOT / "configs" / "models"]
    for extra in os.environ.get("SOLUTION_MODEL_CONFIGS", "").split(os.pathsep):
        if extra:
            dirs.append(Path(extra))
    return dirs


def known_configs() -> dict[str, Path]:
    """Every architecture name (the JSON file's stem) -> its file."""
    reg: dict[str, Path] = {}
    for d in config_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                reg[p.stem] = p
    return reg


def read_config(name: str) -> dict:
    """The architecture dict of one name (``/`` spelled ``-`` as upstream does)."""
    reg = known_configs()
    key = name.replace("/", "-")
    if key not in reg:
        raise SolutionError(f"unknown model name {name!r}; known: {', '.join(sorted(reg))}")
    info = json.loads(reg[key].read_text(encoding="utf-8"))
    if isinstance(info.get("vision_layers"), str):  # RN50 stores "[3, 4, 6, 3]": parse, never eval
        info["vision_layers"] = json.loads(info["vision_layers"])
    return info


def vision_models() -> list[str]:
    return sorted(n for n in known_configs() if "vision_width" in read_config(n))


def text_models() -> list[str]:
    return sorted(n for n in known_configs() if "text_hidden_size" in read_config(n))


def model_info(vision_model: str, text_model: str) -> dict:
    """The keyword arguments of cn_clip's ``CLIP`` for a vision + text pair of names."""
    vis, txt = read_config(vision_model), read_config(text_model)
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
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
