"""Soup weights: weighted sums of checkpoints' state dicts, streamed, and what identifies a candidate.

A source is a checkpoint path (memory-mapped by ``read_checkpoint(mmap=True)`` and read one at a
time) or a state in memory; a weighted sum is accumulated into one fp32 buffer, so memory stays
bounded whatever the number of ingredients.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Union

import torch

from solution.model import clean_state_dict, read_checkpoint

State = dict  # name -> fp32 tensor
Source = Union[str, State]  # a checkpoint path (streamed) or weights in memory


def weights_of(source: Source) -> dict:
    if isinstance(source, dict):
        return source
    return clean_state_dict(read_checkpoint(source, mmap=True)["state_dict"])


def new_state(template: dict) -> State:
    return {k: torch.empty(shape, dtype=torch.float32) for k, shape in template.items()}


@torch.no_grad()
def mix(terms: Sequence[tuple[Source, float]], out: State) -> State:
    """``out = sum(w * source)`` in fp32, one checkpoint in memory at a time (paths are memory-mapped)."""
    for i, (source, w) in enumerate(terms):
        sd = weights_of(source)
        for k, t in out.items():
            x = sd[k].to(torch.float32)
            if i == 0:
                torch.mul(x, w, out=t)
            else:
                t.add_(x, alpha=w)
        del sd
    return out


def cast_state(state: dict, dtype: torch.dtype) -> dict:
    """``state`` in ``dtype``, converted tensor by tensor in place so two full copies never coexist."""
    for k in list(state):
        if state[k].is_floating_point() and state[k].dtype != dtype:
            state[k] = state[k].to(dtype)
    return state


def recipe_key(terms: Sequence[tuple[str, float]], dtype: str) -> str:
    """Identity of a candidate: the keys of its sources and their weights, in order, and its dtype."""
    blob = json.dumps({"terms": [[k, round(float(w), 12)] for k, w in terms], "dtype": dtype})
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def flatten(parts: Sequence[tuple[dict, float]]) -> dict:
    """Weights over original checkpoints of a weighted sum of soups ``{path: weight}``."""
    out: dict = {}
    for members, w in parts:
        for p, v in members.items():
            out[p] = out.get(p, 0.0) + w * v
    return out
