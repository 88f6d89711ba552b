"""The architecture registry (JSON files named by architecture) and :class:`ModelConfig`.

Folders: upstream's ``clip/model_configs``, ``configs/models`` (the tiny test sizes), then the extra
folders of :func:`model_config_dirs`, which the CLIs enter with ``$SOLUTION_MODEL_CONFIGS`` (the one
place it is read); a later folder's file wins. A vision config holds ``vision_width``, a text one
``text_hidden_size``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solution.common import SolutionError, run_cli

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_CONFIGS_ENV = "SOLUTION_MODEL_CONFIGS"
EXTRA_CONFIG_DIRS: tuple[Path, ...] = ()  # set for a block by model_config_dirs


@contextlib.contextmanager
def model_config_dirs(dirs: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Architectures of the JSON files in ``dirs`` known inside the block (after those already known)."""
    global EXTRA_CONFIG_DIRS
    saved = EXTRA_CONFIG_DIRS
    EXTRA_CONFIG_DIRS = (*saved, *(Path(d) for d in dirs if str(d)))
    try:
        yield
    finally:
        EXTRA_CONFIG_DIRS = saved


def run_model_cli(main, environ: Mapping[str, str] = os.environ) -> int:
    """:func:`solution.common.run_cli` with the architectures of ``$SOLUTION_MODEL_CONFIGS`` known: a CLI's edge."""
    with model_config_dirs(env_config_dirs(environ)):
        return run_cli(main)


def env_config_dirs(environ: Mapping[str, str]) -> list[str]:
    """The folders ``$SOLUTION_MODEL_CONFIGS`` names (``os.pathsep``-separated), for a CLI to pass down."""
    return [d for d in environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep) if d]


def known_configs() -> dict[str, Path]:
    """Every architecture name (the JSON file's stem) -> its file."""
    import cn_clip

    dirs = (Path(cn_clip.__file__).parent / "clip" / "model_configs", PROJECT_ROOT / "configs" / "models")
    return {p.stem: p for d in (*dirs, *EXTRA_CONFIG_DIRS) if d.is_dir() for p in sorted(d.glob("*.json"))}


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
    # {"mode": "full"|"lora", "freeze_vision": bool, "freeze_text": bool, "lora": {...} or None, "merged": bool}
    tuning: dict = field(default_factory=lambda: {"mode": "full"})
    model_info: dict = field(default_factory=dict)  # the full architecture: rebuilds without the registry file

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
