"""The vllm backend's own logic, with no engine (so in the main suite): its reading of vLLM's flat
log-prob arrays equals its row-by-row reading, on arrays laid out as vLLM lays them out, and any
other layout falls back to the rows; a refused job cancels the rest of its request; the queue limit
holds. (The backend against a real vLLM engine is tested in test_vllm_backend.py, in the vLLM
stage.)"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from opd.bundled import TEACHER_PATH
from services.teacher.backends.base import ScoreJob
from services.teacher.backends.vllm import VLLMBackend, _score_by_rows, flat_score
from shared.errors import InvalidRequest, QueueFull


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


class OneRefused(VLLMBackend):
    """The backend's own score(), over jobs that each wait or are refused as vLLM would refuse."""

    cancelled: list[int]

    async def _score(self, job):
        if job.n_prompt == 1:
            raise InvalidRequest("refused by the engine")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.append(job.n_prompt)
            raise


def test_a_refused_job_cancels_the_others_in_its_request():
    backend = OneRefused(str(TEACHER_PATH))
    backend.cancelled = []
    jobs = [ScoreJob([1, 5, 6], n) for n in (2, 1, 2)]

    async def refused_then_what_is_left() -> list[int]:
        with pytest.raises(InvalidRequest):
            await backend.score(jobs)
        await asyncio.sleep(0)  # the loop runs on: the cancellations land, or they never come
        return list(backend.cancelled)  # as it is now, before asyncio.run cancels what is left

    assert asyncio.run(refused_then_what_is_left()) == [2, 2]  # no engine request left running


def test_the_vllm_backend_holds_requests_to_the_queue_limit_as_the_hf_backend_does():
    """vLLM would queue anything; sequences sent to the engine and not yet scored count."""
    backend = OneRefused(str(TEACHER_PATH), max_queue_tokens=8)
    backend.cancelled = []

    async def over_the_limit_then_freed() -> int:
        waiting = backend.score_each([ScoreJob([1, 5, 6, 7, 8], 2)])  # 5 tokens, at the engine
        with pytest.raises(QueueFull, match="5 tokens waiting, limit 8"):
            backend.score_each([ScoreJob([1, 5, 6, 7], 2)])
        assert backend.queue_depth() == 1
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        return backend.queue_depth()

    assert asyncio.run(over_the_limit_then_freed()) == 0
