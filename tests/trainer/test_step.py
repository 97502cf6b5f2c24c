"""One update's tensors: the student's log-probs of its own tokens, and --cut-at-error leaving every
position after a rollout's first teacher-flagged error out of the loss."""

from __future__ import annotations

import numpy as np
import torch

from services.trainer.config import RunConfig
from services.trainer.rollout import sample_rollouts
from services.trainer.step import distillation_loss, sampled_logprobs, student_logprobs
from shared.protocol import SequenceScore
from shared.task import problems


def rollouts_of(student, n_problems: int = 4, horizon: int = 24):
    model, tokenizer = student
    return sample_rollouts(
        model,
        tokenizer,
        problems("train", n_problems, seed=3),
        2,
        horizon,
        torch.Generator().manual_seed(0),
        lambda _: None,
        64,
    )


def test_sampled_logprobs_pick_each_rollouts_tokens_and_are_zero_past_its_end(student):
    rollouts = rollouts_of(student, horizon=256)
    assert len({len(r.completion_ids) for r in rollouts}) > 1  # ragged, so padding exists
    with torch.no_grad():
        logp_B_T_V, _ = student_logprobs(student[0], rollouts)
    picked_B_T = sampled_logprobs(logp_B_T_V, rollouts)
    for b, r in enumerate(rollouts):
        n = len(r.completion_ids)
        assert torch.allclose(picked_B_T[b, :n], torch.tensor(r.sample_logprobs), atol=1e-4)
        assert torch.all(picked_B_T[b, n:] == 0)


def scores_with_an_error(rollouts, error_at: int, after: float) -> dict[int, SequenceScore]:
    """Teacher log-probs equal to the student's, except an error (-20) at `error_at` of rollout 0 and
    the value `after` at every later position of it."""
    scores = {}
    for r in rollouts:
        lp = np.array(r.sample_logprobs, dtype=np.float32)
        if r.key == 0:
            lp[error_at] = -20.0
            lp[error_at + 1 :] = after
        scores[r.key] = SequenceScore(logprobs=lp)
    return scores


def test_cut_at_error_drops_what_follows_the_first_error_and_keeps_the_error(student):
    rollouts = rollouts_of(student)
    error_at = 5
    n0 = len(rollouts[0].completion_ids)
    assert n0 > error_at + 3
    total = sum(len(r.completion_ids) for r in rollouts)
    cut = RunConfig(cut_at_error=2.0)
    losses = []
    for after in (-0.5, -15.0):
        result = distillation_loss(
            student[0], rollouts, scores_with_an_error(rollouts, error_at, after), cut
        )
        assert result.cut_tokens == n0 - error_at - 1
        assert result.tokens == total - result.cut_tokens
        losses.append(float(result.loss))
    # What the teacher said after the error does not reach the loss; the error itself does.
    assert losses[0] == losses[1]
    clean = scores_with_an_error(rollouts, error_at, -0.5)
    clean[0] = SequenceScore(logprobs=np.array(rollouts[0].sample_logprobs, dtype=np.float32))
    without_error = distillation_loss(student[0], rollouts, clean, cut)
    assert without_error.cut_tokens == 0 and float(without_error.loss) != losses[0]
    # Off by default: every rollout token is trained on.
    uncut = distillation_loss(
        student[0], rollouts, scores_with_an_error(rollouts, error_at, -15.0), RunConfig()
    )
    assert uncut.cut_tokens == 0 and uncut.tokens == total and float(uncut.loss) != losses[1]
