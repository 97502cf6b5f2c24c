"""Padding ragged rows: every real value lands in its row's first columns, the rest is the fill."""

from __future__ import annotations

import numpy as np
import torch

from opd.padding import left_pad, pad_id, right_pad
from shared.tokenizer import build_tokenizer


def test_right_pad_keeps_each_row_at_the_left_and_fills_the_rest():
    out = right_pad([[1, 2, 3], [], np.array([4])], fill=-1)
    assert out.tolist() == [[1, 2, 3], [-1, -1, -1], [4, -1, -1]]
    assert right_pad([[0.5]], 0.0, torch.float32, width=3).tolist() == [[0.5, 0.0, 0.0]]
    assert right_pad([], fill=0, width=3).shape == (0, 3)


def test_right_pad_pads_rows_of_top_k_columns_along_their_first_axis():
    rows = [np.arange(6).reshape(3, 2), np.zeros((0, 2)), np.full((1, 2), 9)]
    out = right_pad(rows, fill=-1, width=4)
    assert out.shape == (3, 4, 2)
    assert out[0, :3].tolist() == [[0, 1], [2, 3], [4, 5]] and (out[0, 3] == -1).all()
    assert (out[1] == -1).all() and out[2, 0].tolist() == [9, 9] and (out[2, 1:] == -1).all()


def test_left_pad_ends_every_prompt_at_the_last_column_and_masks_the_padding():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_id_is_the_pad_token_else_eos():
    tokenizer = build_tokenizer()
    assert pad_id(tokenizer) == tokenizer.pad_token_id == 0
    tokenizer.pad_token = None
    assert pad_id(tokenizer) == tokenizer.eos_token_id == 2
