"""The hf backend's limits (the longest sequence it serves never exceeds the model's positions), and
its two decoder passes: sequences that share a prompt run it once and get the same hidden states."""

from __future__ import annotations

import pytest
import torch

from opd.bundled import TEACHER_PATH
from services.teacher.backends.base import ScoreJob
from services.teacher.backends.hf import HFBackend, worth_sharing
from tests.teacher.test_scoring_correctness import samples_of_few_prompts


@pytest.mark.parametrize("asked, served", [(None, 512), (300, 300), (4096, 512)])
def test_max_seq_len_is_capped_by_the_models_positions(asked, served):
    # models/tiny-teacher has 512 positions; the default max_batch_tokens is larger.
    assert HFBackend(str(TEACHER_PATH), max_seq_len=asked).load().max_seq_len == served


@pytest.fixture(scope="module")
def backend():
    hf = HFBackend(str(TEACHER_PATH))
    hf.load()
    return hf


def test_prompts_shared_by_several_sequences_run_once_with_the_same_result(backend):
    jobs = [
        ScoreJob(prompt + completion, len(prompt))
        for prompt, completion in samples_of_few_prompts(backend.tokenizer)
    ]
    assert backend.cache_arg is not None  # a Llama decoder takes a KV cache
    assert worth_sharing(jobs)  # so the HTTP test with these sequences takes the shared pass too
    with torch.inference_mode():
        shared, plain = backend._rows_sharing_prompts(jobs), backend._rows(jobs)
    for job, a, b in zip(jobs, shared, plain):
        assert a.shape == b.shape == (job.n_scored, backend.lm_head.weight.shape[1])
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_share_prompts_off_leaves_every_batch_to_the_one_pass():
    plain = HFBackend(str(TEACHER_PATH), share_prompts=False)
    plain.load()
    assert plain.cache_arg is None  # score_batch then never takes the shared pass


def test_sharing_is_for_prompts_that_are_much_of_the_batch(backend):
    samples = [ScoreJob([1] + [5] * 30 + [7] * 26, 31) for _ in range(4)]  # 3 x 31 of 228 saved
    assert worth_sharing(samples)
    # The TRL dialect scores whole sequences after their <bos>: sharing it saves nothing.
    whole = [ScoreJob(job.input_ids, 1) for job in samples]
    assert not worth_sharing(whole)
    assert not worth_sharing(samples[:1])
