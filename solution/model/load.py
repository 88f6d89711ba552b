"""Building cn_clip's ``CLIP`` from a :class:`ModelConfig` and loading checked weights into it.

Every consumer (training, features, soup) checks weights the same way, each failure one
:class:`SolutionError` line naming the file: :func:`~solution.model.checkpoint.resolve_config`
(architecture names in the registry, of the right kind; a complete ``model_info``),
:func:`check_shapes` (every tensor of the model built from that config, in its shape;
:func:`load_weights` runs it) and :func:`check_finite` (no NaN/Inf). :func:`load_model` does all
of it for one checkpoint file. :func:`meta_model` is the one place a model is built on the meta
device (no memory); :func:`model_template` holds its names and shapes.

Attention: every model built here runs its text tower's self-attention through
``scaled_dot_product_attention`` (:mod:`cn_clip_patch.attention`, equal to upstream within float
rounding) unless ``attn_impl="upstream"`` (upstream's hand-written attention) is asked for; see
:data:`ATTN_IMPLS` and :func:`set_attn_impl`. The vision tower reaches SDPA either way.
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

ATTN_IMPLS = ("sdpa", "upstream")  # the text tower's attention: fused SDPA (default) or upstream's own


def set_attn_impl(model: torch.nn.Module, attn_impl: str = "sdpa") -> torch.nn.Module:
    """Switch ``model``'s text-tower attention to ``attn_impl`` (one of :data:`ATTN_IMPLS`) in place.

    Per model instance (:func:`cn_clip_patch.attention.use_sdpa`): parameters, state-dict keys
    and other models are unchanged. Returns the model."""
    if attn_impl not in ATTN_IMPLS:
        raise SolutionError(f"unknown attention implementation {attn_impl!r}: use one of {', '.join(ATTN_IMPLS)}")
    from cn_clip_patch.attention import use_sdpa

    use_sdpa(model, attn_impl == "sdpa")
    return model


def build_model(config: ModelConfig, device: str | torch.device = "cpu", attn_impl: str = "sdpa") -> torch.nn.Module:
    """A randomly initialised fp32 cn_clip ``CLIP`` (upstream class), its text attention on ``attn_impl``."""
    from cn_clip.clip.model import CLIP

    model = set_attn_impl(CLIP(**config.model_info), attn_impl)
    return model.to(device)


def meta_model(config: ModelConfig, attn_impl: str = "sdpa") -> torch.nn.Module:
    """``config``'s ``CLIP`` on the meta device: every tensor's name and shape, no memory, no init;
    its text attention on ``attn_impl``.

    Give it storage with ``to_empty(device=...)`` and then load weights, or load them with
    ``load_state_dict(..., assign=True)``."""
    return set_attn_impl(_meta_clip(config.model_info), attn_impl)


def _meta_clip(info: Mapping) -> torch.nn.Module:
    from cn_clip.clip.model import CLIP

    with torch.device("meta"):
        return CLIP(**info)


def model_template(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of ``config``'s model (from :func:`meta_model`: no memory)."""
    return dict(_template(json.dumps(config.model_info, sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _template(info: str) -> tuple:
    model = _meta_clip(json.loads(info))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _count(names) -> str:
    return f"{len(names)} tensor{'' if len(names) == 1 else 's'}"


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def check_shapes(
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple],
    config: ModelConfig,
    source: str,
    original: Mapping[str, torch.Tensor] | None = None,
) -> None:
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
    head = (
        f"{source} holds a {theirs} model, not {config.arch}"
        if theirs != config.arch
        else f"{source} does not fit {config.arch}"
    )
    raise SolutionError(f"{head}: {'; '.join(parts)}")


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf: one line naming the file and the first such tensors."""
    bad = [k for k, t in sd.items() if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SolutionError(
            f"{source} has non-finite weights (NaN or Inf) in {_count(bad)}: "
            f"{', '.join(bad[:3])}{more}; a diverged run? use an earlier checkpoint"
        )


def _resizable_positions(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple]) -> bool:
    """Whether upstream's ``resize_pos_embed`` can adapt the ViT position grid (a square grid of our width)."""
    key = "visual.positional_embedding"
    pos, want = sd.get(key), expected.get(key)
    if (
        pos is None
        or want is None
        or pos.ndim != 2
        or len(want) != 2
        or pos.shape[1] != want[1]
        or pos.shape[0] == want[0]
    ):
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


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", attn_impl: str = "sdpa", **overrides
) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """Build the model a checkpoint describes and load its weights: ``(model, config, checkpoint)``.

    The text tower's attention runs on ``attn_impl`` (:data:`ATTN_IMPLS`). Every check of
    :func:`~solution.model.checkpoint.resolve_config` (names against the registry) and
    :func:`load_weights` (shapes against the built model, finite weights) applies.
    """
    ckpt = read_checkpoint(path)
    config = resolve_config(ckpt, source=str(path), **overrides)
    model = build_model(config, attn_impl=attn_impl)
    load_weights(model, ckpt["state_dict"], config, str(path))
    return model.to(device), config, ckpt
