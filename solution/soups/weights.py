"""Soup weights: weighted sums of checkpoints' state dicts, streamed, and what identifies a candidate.

A term of a sum is anything with a ``key`` (its identity) and a ``source``: a checkpoint path
(memory-mapped and read one at a time) or a state in memory. A sum is accumulated into one fp32
buffer, so memory stays bounded whatever the number of ingredients.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Union

import torch

from solution.model import clean_state_dict, read_checkpoint

State = dict  # name -> fp32 tensor
Source = Union[str, State]


def weights_of(source: Source) -> dict:
    return source if isinstance(source, dict) else clean_state_dict(read_checkpoint(source, mmap=True)["state_dict"])


@torch.no_grad()
def mix(terms: Sequence[tuple[object, float]], template: dict, out: State | None = None) -> State:
    """``sum(w * term.source)`` in fp32 into ``out`` (a new buffer shaped as ``template`` when None),
    one checkpoint in memory at a time."""
    out = out if out is not None else {k: torch.empty(shape, dtype=torch.float32) for k, shape in template.items()}
    for i, (term, w) in enumerate(terms):
        sd = weights_of(term.source)
        for k, t in out.items():
            if i == 0:
                torch.mul(sd[k].to(torch.float32), w, out=t)
            else:
                t.add_(sd[k].to(torch.float32), alpha=w)
        del sd
    return out


def recipe_key(terms: Sequence[tuple[object, float]], dtype: str) -> str:
    """Identity of a candidate: its terms' keys and weights, in order, and its dtype."""
    blob = json.dumps({"terms": [[t.key, round(float(w), 12)] for t, w in terms], "dtype": dtype})
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def flatten(parts: Sequence[tuple[dict, float]]) -> dict:
    """Weights over the original checkpoints ``{path: weight}`` of a weighted sum of soups' members."""
    out: dict = {}
    for members, w in parts:
        for p, v in members.items():
            out[p] = out.get(p, 0.0) + w * v
    return out
