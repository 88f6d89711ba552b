"""Building cn_clip's ``CLIP`` from a :class:`ModelConfig` and loading checked weights into it (names, shapes, finite
values: each failure one line naming the file). The text tower's attention is ``attn_impl`` (:data:`ATTN_IMPLS`)."""

import functools
import json
import logging
import math
from collections.abc import Mapping

import torch

from solution.common import SolutionError

from .checkpoint import clean_state_dict, infer_architecture, read_checkpoint, resolve_config
from .registry import ModelConfig

log = logging.getLogger(__name__)

ATTN_IMPLS = ("sdpa", "upstream")
POSITIONS = "visual.positional_embedding"


def build_model(config: ModelConfig, device: str | torch.device = "cpu", attn_impl: str = "sdpa") -> torch.nn.Module:
    """A randomly initialised fp32 cn_clip ``CLIP`` (upstream's class)."""
    from cn_clip.clip.model import CLIP

    from cn_clip_patch.attention import use_sdpa

    if attn_impl not in ATTN_IMPLS:
        raise SolutionError(f"unknown attention implementation {attn_impl!r}: use one of {', '.join(ATTN_IMPLS)}")
    model = CLIP(**config.model_info)
    use_sdpa(model, attn_impl == "sdpa")
    return model.to(device)


def meta_model(config: ModelConfig, attn_impl: str = "sdpa") -> torch.nn.Module:
    """``config``'s ``CLIP`` on the meta device (names and shapes, no memory, no random init)."""
    with torch.device("meta"):
        return build_model(config, "meta", attn_impl)


def model_template(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of ``config``'s model."""
    return dict(_template(json.dumps(config.model_info, sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _template(info: str) -> tuple:
    model = meta_model(ModelConfig("", "", model_info=json.loads(info)))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _count(names) -> str:
    return f"{len(names)} tensor{'' if len(names) == 1 else 's'}"


def _listed(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def check_shapes(sd: Mapping, expected: Mapping, config: ModelConfig, source: str, original: Mapping | None = None):
    """Refuse a clean state dict missing tensors of ``expected`` or holding them in other shapes: one line naming
    the file, ``config``'s architecture and the one its shapes (``original``'s when given) look like."""
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
    bad = [k for k, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise SolutionError(
            f"{source} has non-finite weights (NaN or Inf) in {_count(bad)}: {_listed(bad)}; "
            "a diverged run? use an earlier checkpoint"
        )


def _resizable(pos: torch.Tensor | None, want: tuple | None) -> bool:
    """Whether upstream's ``resize_pos_embed`` can adapt a ViT position grid: square, of our width, another size."""
    if pos is None or want is None or pos.ndim != 2 or pos.shape[1] != want[1] or pos.shape[0] == want[0]:
        return False
    return pos.shape[0] > 1 and math.isqrt(pos.shape[0] - 1) ** 2 == pos.shape[0] - 1


def load_weights(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Load a (possibly ``module.``-prefixed) state dict into ``model`` after :func:`check_shapes` (a ViT position
    grid of another resolution resized as upstream does) and :func:`check_finite`; a :func:`meta_model` too."""
    from cn_clip.clip.model import resize_pos_embed

    original = clean_state_dict(sd)
    sd, own = dict(original), model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    if _resizable(sd.get(POSITIONS), expected.get(POSITIONS)):
        resize_pos_embed(sd, model)
    check_shapes(sd, expected, config, source, original)
    check_finite({k: v for k, v in original.items() if k in own}, source)
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        log.warning("%s: ignoring %d unexpected tensors (e.g. %s)", source, len(unexpected), unexpected[0])
    meta = any(t.is_meta for t in own.values())
    model.load_state_dict({k: v.to(own[k].dtype, copy=meta) for k, v in sd.items() if k in own}, assign=meta)


def load_model(path, *, device="cpu", attn_impl="sdpa", **overrides) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """``(model, config, checkpoint)`` of a checkpoint file, its weights checked (no random init);
    ``overrides``: :func:`~.checkpoint.resolve_config`'s flags."""
    ckpt = read_checkpoint(path)
    config = resolve_config(ckpt, source=str(path), **overrides)
    model = meta_model(config, attn_impl)
    load_weights(model, ckpt["state_dict"], config, str(path))
    return model.to(device), config, ckpt
