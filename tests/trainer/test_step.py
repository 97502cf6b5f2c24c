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
    the value `after` at every later position of it; the top-2 lists say the same."""
    scores = {}
    for r in rollouts:
        lp = np.array(r.sample_logprobs, dtype=np.float32)
        if r.key == 0:
            lp[error_at] = -20.0
            lp[error_at + 1 :] = after
        ids = np.array([[t, (t + 1) % 10] for t in r.completion_ids], dtype=np.int32)
        top_lp = np.stack([lp, 2 * lp - 1.0], axis=1).astype(np.float32)
        scores[r.key] = SequenceScore(logprobs=lp, topk_ids=ids, topk_logprobs=top_lp)
    return scores


def test_cut_at_error_drops_what_follows_the_first_error_and_keeps_the_error(student):
    model = student[0]
    rollouts = rollouts_of(student)
    error_at = 5
    n0 = len(rollouts[0].completion_ids)
    assert n0 > error_at + 3
    total = sum(len(r.completion_ids) for r in rollouts)
    for loss in ("reverse_kl", "forward_kl_topk"):
        for cut_at_error in (2.0, None):
            cfg = RunConfig(cut_at_error=cut_at_error, loss=loss, top_k=2)
            mild, harsh = (
                distillation_loss(
                    model, rollouts, scores_with_an_error(rollouts, error_at, after), cfg
                )
                for after in (-0.5, -15.0)
            )
            # The reported KL covers every rollout token, cut or not.
            assert harsh.reverse_kl > mild.reverse_kl
            if cut_at_error is None:  # off (the default): every token is trained on
                assert mild.cut_tokens == 0 and mild.tokens == total
                assert float(mild.loss.detach()) != float(harsh.loss.detach()), loss
                continue
            # The error stays in the loss; what the teacher said after it does not reach it.
            for result in (mild, harsh):
                assert result.cut_tokens == n0 - error_at - 1
                assert result.tokens == total - result.cut_tokens
            assert float(mild.loss.detach()) == float(harsh.loss.detach()), loss
