"""The vllm backend's reading of vLLM's flat log-prob arrays equals its row-by-row reading, on arrays
laid out as vLLM lays them out; any other layout falls back to the rows. (The backend against a real
vLLM engine is tested in test_vllm_backend.py, in the vLLM stage.)"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from services.teacher.backends.base import ScoreJob
from services.teacher.backends.vllm import _score_by_rows, flat_score


@dataclass
class Flat:
    """vLLM's FlatLogprobs as its `append_fast` fills it: per position the actual token (with its
    rank), then the top-k by rank; the first prompt position has no entry."""

    start_indices: list = field(default_factory=list)
    end_indices: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    ranks: list = field(default_factory=list)

    def append(self, entries: list[tuple[int, float, int]]) -> None:
        self.start_indices.append(len(self.token_ids))
        for token, logprob, rank in entries:
            self.token_ids.append(token)
            self.logprobs.append(logprob)
            self.ranks.append(rank)
        self.end_indices.append(len(self.token_ids))


def vllm_layout(ids: list[int], k: int, seed: int = 0, nan_at: int | None = None) -> Flat:
    rng = np.random.default_rng(seed)
    flat = Flat()
    flat.append([])  # the first prompt token has no log-prob
    for p, actual in enumerate(ids[1:]):
        logp = np.log(rng.dirichlet(np.ones(30)))
        order = np.argsort(-logp, kind="stable")
        rank = int(np.where(order == actual)[0][0]) + 1
        own = math.nan if p == nan_at else float(logp[actual])
        flat.append(
            [(actual, own, rank)]
            + [(int(t), float(logp[t]), r + 1) for r, t in enumerate(order[:k])]
        )
    return flat


@pytest.mark.parametrize("k", [0, 1, 5])
def test_the_flat_reading_equals_the_row_reading(k):
    ids = [1, 4, 7, 7, 2, 9, 11, 3, 5]
    job = ScoreJob(ids, n_prompt=3, top_k=k)
    flat = vllm_layout(ids, k, nan_at=4)
    by_rows = _score_by_rows(job, ids, SimpleNamespace(prompt_logprobs=flat), generating=False)
    fast = flat_score(flat, ids, 3, k)
    np.testing.assert_array_equal(fast.logprobs, by_rows.logprobs)
    assert fast.logprobs[4 - 2] == -np.inf  # a NaN from vLLM reads as -inf, both ways
    if k:
        np.testing.assert_array_equal(fast.topk_ids, by_rows.topk_ids)
        np.testing.assert_array_equal(fast.topk_logprobs, by_rows.topk_logprobs)
        assert fast.topk_ids.dtype == np.int32 and fast.topk_logprobs.dtype == np.float32
    else:
        assert fast.topk_ids is None and by_rows.topk_ids is None


def test_any_other_layout_is_left_to_the_rows():
    ids = [1, 4, 7, 2, 9]
    flat = vllm_layout(ids, 2)
    assert flat_score(flat, ids, 2, 3) is None  # rows of another width
    assert flat_score(flat, [1, 4, 7, 2, 8], 2, 2) is None  # another actual token first
    assert flat_score([None, {4: None}], ids, 2, 2) is None  # dict log-probs
