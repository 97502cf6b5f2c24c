"""Ragged rows to padded tensors: right-padded for scoring and training, left-padded for decoding
(so every prompt ends at the column where generation starts)."""

from __future__ import annotations

import numpy as np
import torch


def right_pad(rows: list, fill, dtype=torch.long, width: int | None = None) -> torch.Tensor:
    """[len(rows), width, *row dims] (width: the longest row's by default), each row right-padded
    with `fill`. Rows are lists or arrays; rows of shape [n_b, k] give [B, width, k]."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    row_dims = np.shape(rows[0])[1:] if rows else ()
    out = torch.full((len(rows), width, *row_dims), fill, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.as_tensor(row, dtype=dtype)
    return out


def pad_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else (many Llama and Mistral tokenizers
    have none) its <eos>, as Hugging Face pipelines do. Padding is masked out or never read, so the
    choice changes no result, and the tokenizer itself is left as it is: its fingerprint must
    still match the teacher's."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into (ids_B_P, mask_B_P) so every prompt ends at the same column."""
    if any(not p for p in prompts):  # a row of padding alone: nothing to condition on
        raise ValueError("an empty prompt: give each at least one token (a <bos>)")
    width = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt) :] = torch.tensor(prompt)
        mask[b, width - len(prompt) :] = 1
    return ids, mask
