"""Model registry, building, and the checkpoint contract.

Import from here (``from solution.model import load_model``): the package's public names, whatever
module inside holds them. ``registry`` (architecture names, :class:`ModelConfig`), ``checkpoint``
(the one reader/writer of checkpoint files, architecture inference), ``build`` (the model, its
meta-device template, weight checks and loading, the text-attention switch ``attn_impl``).
"""

from .checkpoint import (
    clean_state_dict,
    infer_architecture,
    read_checkpoint,
    resolve_config,
    save_checkpoint,
    state_dict_digest,
)
from .load import (
    ATTN_IMPLS,
    build_model,
    check_finite,
    check_shapes,
    load_model,
    load_weights,
    meta_model,
    model_template,
    set_attn_impl,
)
from .registry import ModelConfig, config_dirs, model_info, text_models, vision_models

__all__ = [
    "ATTN_IMPLS",
    "ModelConfig",
    "build_model",
    "check_finite",
    "check_shapes",
    "clean_state_dict",
    "config_dirs",
    "infer_architecture",
    "load_model",
    "load_weights",
    "meta_model",
    "model_info",
    "model_template",
    "read_checkpoint",
    "resolve_config",
    "save_checkpoint",
    "set_attn_impl",
    "state_dict_digest",
    "text_models",
    "vision_models",
]
