"""Building cn_clip's ``CLIP`` from a :class:`ModelConfig` and loading checked weights into it.

Every consumer checks weights the same way, each failure one :class:`SolutionError` line naming the
file: names (:func:`~.checkpoint.resolve_config`), shapes (:func:`check_shapes`), finite values
(:func:`check_finite`). The text tower's attention runs on ``attn_impl`` (:data:`ATTN_IMPLS`: fused
SDPA, or cn_clip's own); the vision tower reaches SDPA either way.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping

import torch

from solution.common import SolutionError

from .checkpoint import clean_state_dict, infer_architecture, read_checkpoint, resolve_config
from .registry import ModelConfig

log = logging.getLogger(__name__)

ATTN_IMPLS = ("sdpa", "upstream")


def set_attn_impl(model: torch.nn.Module, attn_impl: str = "sdpa") -> torch.nn.Module:
    """Switch ``model``'s text-tower attention to ``attn_impl`` in place (this instance only); returns it."""
    if attn_impl not in ATTN_IMPLS:
        raise SolutionError(f"unknown attention implementation {attn_impl!r}: use one of {', '.join(ATTN_IMPLS)}")
    from cn_clip_patch.attention import use_sdpa

    use_sdpa(model, attn_impl == "sdpa")
    return model


def build_model(config: ModelConfig, device: str | torch.device = "cpu", attn_impl: str = "sdpa") -> torch.nn.Module:
    """A randomly initialised fp32 cn_clip ``CLIP`` (upstream's class)."""
    from cn_clip.clip.model import CLIP

    return set_attn_impl(CLIP(**config.model_info), attn_impl).to(device)


def meta_model(config: ModelConfig, attn_impl: str = "sdpa") -> torch.nn.Module:
    """``config``'s ``CLIP`` on the meta device (names and shapes, no memory): give it storage with
    ``to_empty(device=...)``, or load weights with ``load_state_dict(..., assign=True)``."""
    from cn_clip.clip.model import CLIP

    with torch.device("meta"):
        return set_attn_impl(CLIP(**config.model_info), attn_impl)


def model_template(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of ``config``'s model."""
    return dict(_template(json.dumps(config.model_info, sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _template(info: str) -> tuple:
    model = meta_model(ModelConfig("", "", model_info=json.loads(info)))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _count(names) -> str:
    return f"{len(names)} tensor{'' if len(names) == 1 else 's'}"


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _listed(items: list[str]) -> str:
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


def check_shapes(
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple],
    config: ModelConfig,
    source: str,
    original: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Refuse a clean state dict missing tensors of ``expected`` or holding them in other shapes: one line
    naming the file, its config's architecture, the one its shapes (``original``'s when given) look like."""
    bad = [k for k, shape in expected.items() if k in sd and tuple(sd[k].shape) != tuple(shape)]
    missing = [k for k in expected if k not in sd]
    if not bad and not missing:
        return
    v, t = infer_architecture(original if original is not None else sd)
    theirs = f"{v or '?'}@{t or '?'}"
    parts = []
    if bad:
        dims = [f"{k} {_shape(sd[k].shape)} vs {_shape(expected[k])}" for k in bad]
        parts.append(f"{_count(bad)} {'differs' if len(bad) == 1 else 'differ'} in shape ({_listed(dims)})")
    if missing:
        parts.append(f"{_count(missing)} missing ({_listed(missing)})")
    head = f"{source} holds a {theirs} model, not" if theirs != config.arch else f"{source} does not fit"
    raise SolutionError(f"{head} {config.arch}: {'; '.join(parts)}")


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf: one line naming the file and the first such tensors."""
    bad = [k for k, t in sd.items() if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SolutionError(
            f"{source} has non-finite weights (NaN or Inf) in {_count(bad)}: "
            f"{', '.join(bad[:3])}{more}; a diverged run? use an earlier checkpoint"
        )


def _resizable_positions(pos: torch.Tensor | None, want: tuple | None) -> bool:
    """Whether upstream's ``resize_pos_embed`` can adapt the ViT position grid (a square grid of our width)."""
    if pos is None or want is None or pos.ndim != 2 or len(want) != 2 or pos.shape[1] != want[1]:
        return False
    side = int(round((pos.shape[0] - 1) ** 0.5))
    return pos.shape[0] != want[0] and pos.shape[0] > 1 and side * side == pos.shape[0] - 1


def load_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Load a (possibly ``module.``-prefixed) state dict into ``model`` (built from ``config``), after
    :func:`check_shapes` (a ViT position grid of another resolution is resized as upstream does) and
    :func:`check_finite`."""
    from cn_clip.clip.model import resize_pos_embed

    sd = clean_state_dict(sd)
    original = dict(sd)
    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    key = "visual.positional_embedding"
    if _resizable_positions(sd.get(key), expected.get(key)):
        resize_pos_embed(sd, model)
    check_shapes(sd, expected, config, source, original)
    check_finite({k: v for k, v in original.items() if k in own}, source)
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        log.warning("%s: ignoring %d unexpected tensors (e.g. %s)", source, len(unexpected), unexpected[0])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k in own})


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", attn_impl: str = "sdpa", **overrides
) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """The model a checkpoint file describes, with its checked weights: ``(model, config, checkpoint)``;
    ``overrides`` are :func:`~.checkpoint.resolve_config`'s flags."""
    ckpt = read_checkpoint(path)
    config = resolve_config(ckpt, source=str(path), **overrides)
    model = build_model(config, attn_impl=attn_impl)
    load_weights(model, ckpt["state_dict"], config, str(path))
    return model.to(device), config, ckpt
