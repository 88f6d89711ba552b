"""Text prompt + tokenisation: the single place where a text becomes token ids.

Upstream's ``tokenize`` pads every text to ``context_length``; the BERT tower masks padding,
so cutting each batch to its longest text gives the same features for much less compute.
The prompt (e.g. ``这是一张图片，里面存在商品：``) is prepended before upstream's own text
normalisation, so training, validation and inference see exactly the same token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from cn_clip.clip import _tokenizer
from cn_clip.clip import tokenize as _upstream_tokenize
from cn_clip.training.data import _preprocess_text  # upstream's normalisation (lower-case, quotes)

PAD_ID = _tokenizer.vocab["[PAD]"]


class PromptError(ValueError):
    pass


def apply_prompt(text: str, prompt: str = "") -> str:
    return f"{prompt}{text}" if prompt else text


def prompt_length(prompt: str) -> int:
    """Number of word pieces the prompt takes."""
    return len(_tokenizer.tokenize(_preprocess_text(prompt))) if prompt else 0


def check_prompt(prompt: str, context_length: int) -> None:
    """Refuse a prompt that leaves no room for the text inside ``context_length``."""
    n = prompt_length(prompt)
    if n + 2 >= context_length:  # [CLS] prompt [SEP] would already fill the context
        raise PromptError(
            f"text prompt takes {n} tokens; with [CLS] and [SEP] it leaves no room for text "
            f"in a context length of {context_length}"
        )


def tokenize(texts: Sequence[str], context_length: int = 52, prompt: str = "", trim: bool = True) -> torch.Tensor:
    """Token ids ``[N, L]`` exactly as upstream makes them (after the prompt), cut to the longest text."""
    if isinstance(texts, str):
        texts = [texts]
    tokens = _upstream_tokenize(
        [_preprocess_text(apply_prompt(str(t), prompt)) for t in texts], context_length=context_length
    )
    if trim and len(texts):
        length = int(tokens.ne(PAD_ID).sum(1).max())
        tokens = tokens[:, :length].contiguous()
    return tokens


def token_lengths(texts: Sequence[str], context_length: int = 52, prompt: str = "") -> list[int]:
    """Lengths (with [CLS]/[SEP], capped at context_length) for bucketing texts by length."""
    return [
        min(len(_tokenizer.tokenize(_preprocess_text(apply_prompt(str(t), prompt)))) + 2, context_length) for t in texts
    ]
