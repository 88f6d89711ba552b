"""Models: the architecture registry, the checkpoint contract, building and loading checked weights. Import from here
(``from solution.model import load_model``), whatever module inside holds a name."""

from .checkpoint import (
    clean_state_dict,
    fingerprint,
    read_checkpoint,
    refuse_unmerged_lora,
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
)
from .registry import ModelConfig
