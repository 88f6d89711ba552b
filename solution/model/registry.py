"""The architecture registry and :class:`ModelConfig`: JSON files named by architecture in upstream's
``clip/model_configs``, ``configs/models`` (the tiny test sizes) and the folders of ``$SOLUTION_MODEL_CONFIGS``
(read at a CLI's edge only), a later folder's file winning."""

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solution.common import SolutionError, run_cli

MODEL_CONFIGS_ENV = "SOLUTION_MODEL_CONFIGS"
EXTRA_CONFIG_DIRS: tuple[Path, ...] = ()  # set for a block by model_config_dirs
MARKERS = {"vision": "vision_width", "text": "text_hidden_size"}  # the key a config of each kind holds


@contextlib.contextmanager
def model_config_dirs(dirs: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Architectures of the JSON files in ``dirs`` known inside the block (after those already known)."""
    global EXTRA_CONFIG_DIRS
    saved = EXTRA_CONFIG_DIRS
    EXTRA_CONFIG_DIRS = (*saved, *map(Path, dirs))
    try:
        yield
    finally:
        EXTRA_CONFIG_DIRS = saved


def run_model_cli(main, environ: Mapping[str, str] = os.environ) -> int:
    """:func:`solution.common.run_cli` with the architectures in the folders ``$SOLUTION_MODEL_CONFIGS`` names
    (``os.pathsep``-separated) known: a CLI's edge."""
    with model_config_dirs(d for d in environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep) if d):
        return run_cli(main)


def known_configs() -> dict[str, Path]:
    """Every architecture name (the JSON file's stem) -> its file."""
    import cn_clip

    dirs = (Path(cn_clip.__file__).parent / "clip" / "model_configs", Path(__file__).parents[2] / "configs" / "models")
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


def models(kind: str) -> list[str]:
    """The architecture names of ``kind`` (``vision`` or ``text``)."""
    return sorted(n for n in known_configs() if MARKERS[kind] in read_config(n))


def model_info(vision_model: str, text_model: str) -> dict:
    """The keyword arguments of cn_clip's ``CLIP`` for a vision + text pair of names."""
    info = {}
    for name, kind in ((vision_model, "vision"), (text_model, "text")):
        config = read_config(name)
        if MARKERS[kind] not in config:
            raise SolutionError(f"{name!r} is not a {kind} model config")
        info.update(config)
    return info


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
        self.model_info = self.model_info or model_info(self.vision_model, self.text_model)

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
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})
