"""The distillation losses compute what their docstrings state, and masked positions never count."""

from __future__ import annotations

import pytest
import torch

from services.trainer import losses

B, T, K = 3, 6, 4
_SEEDED = torch.Generator().manual_seed(0)  # at import: not the global generator
TEACHER = -torch.rand(B, T, generator=_SEEDED) * 3
STUDENT = -torch.rand(B, T, generator=_SEEDED) * 3


@pytest.fixture(autouse=True)
def same_draws_every_run():
    """Each test draws the same numbers whichever tests ran before it."""
    torch.manual_seed(0)


MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float)


def test_masked_mean_averages_real_tokens_and_is_zero_when_there_are_none():
    x = torch.arange(B * T, dtype=torch.float).reshape(B, T)
    want = float(sum(x[b, t] for b in range(B) for t in range(T) if MASK[b, t])) / MASK.sum()
    assert torch.isclose(losses.masked_mean(x, MASK), torch.as_tensor(want))
    assert losses.masked_mean(x, torch.zeros(B, T)) == 0


def test_advantage_is_teacher_minus_student_on_real_tokens():
    adv = losses.reverse_kl_advantage(TEACHER, STUDENT, MASK)
    assert torch.allclose(adv, (TEACHER - STUDENT) * MASK)


def test_discounted_advantage_sums_future_terms():
    gamma = 0.5
    adv = losses.reverse_kl_advantage(TEACHER, STUDENT, MASK, gamma=gamma)
    per_token = (TEACHER - STUDENT) * MASK
    for b in range(B):
        for t in range(T):
            want = sum(gamma ** (s - t) * per_token[b, s] for s in range(t, T)) * MASK[b, t]
            assert torch.isclose(adv[b, t], torch.as_tensor(want), atol=1e-6)


def test_advantage_clipping_bounds_it():
    adv = losses.reverse_kl_advantage(TEACHER * 10, STUDENT, MASK, clip=0.5)
    assert adv.abs().max() <= 0.5


def test_policy_gradient_is_advantage_times_grad_logp_on_policy():
    logits = torch.randn(B, T, 5, requires_grad=True)
    tokens = torch.randint(0, 5, (B, T))
    logp = torch.log_softmax(logits, -1).gather(2, tokens[..., None]).squeeze(-1)
    adv = losses.reverse_kl_advantage(TEACHER, logp, MASK)
    loss = losses.policy_gradient_loss(logp, logp.detach(), adv, MASK)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    manual = -(adv * logp * MASK).sum() / MASK.sum()
    (want,) = torch.autograd.grad(manual, logits)
    assert torch.allclose(grad, want, atol=1e-6)


def test_masked_positions_do_not_change_any_loss():
    noise = torch.randn(B, T) * (1 - MASK) * 100
    noise3 = noise[..., None].expand(B, T, K)
    s3, t3 = -torch.rand(B, T, K), -torch.rand(B, T, K)
    a = losses.reverse_kl_advantage(TEACHER, STUDENT, MASK)
    b = losses.reverse_kl_advantage(TEACHER + noise, STUDENT - noise, MASK)
    assert torch.equal(a, b)
    assert losses.policy_gradient_loss(STUDENT, STUDENT, a, MASK) == losses.policy_gradient_loss(
        STUDENT + noise, STUDENT + noise, b, MASK
    )
    assert torch.isclose(
        losses.topk_forward_kl(s3, t3, MASK), losses.topk_forward_kl(s3 + noise3, t3 - noise3, MASK)
    )
    assert torch.isclose(losses.topk_jsd(s3, t3, MASK), losses.topk_jsd(s3 + noise3, t3, MASK))


def test_topk_divergences_vanish_when_student_equals_teacher_and_are_positive_otherwise():
    t3 = torch.log_softmax(torch.randn(B, T, K), -1)
    s3 = torch.log_softmax(torch.randn(B, T, K), -1)
    assert losses.topk_forward_kl(t3, t3, MASK).abs() < 1e-6
    assert losses.topk_jsd(t3, t3, MASK, beta=0.3).abs() < 1e-6
    assert losses.topk_forward_kl(s3, t3, MASK) > 0
    assert losses.topk_jsd(s3, t3, MASK, beta=0.3) > 0


def jsd_reference(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD(beta) of two probability vectors, from its definition."""
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()


def test_topk_jsd_over_the_whole_vocabulary_is_the_exact_jsd():
    teacher_V = torch.log_softmax(torch.randn(B, T, 7), -1)
    student_V = torch.log_softmax(torch.randn(B, T, 7), -1)
    got = losses.topk_jsd(student_V, teacher_V, MASK, beta=0.3)
    per_token = torch.stack(
        [
            jsd_reference(teacher_V[b, t].exp(), student_V[b, t].exp(), 0.3)
            for b in range(B)
            for t in range(T)
            if MASK[b, t]
        ]
    )
    assert torch.isclose(got, per_token.mean(), atol=1e-6)


def test_topk_jsd_charges_a_student_for_mass_outside_the_teachers_top_k():
    # Over 5 tokens the teacher's top-2 hold 0.9; the student has their shape (2:1 as the teacher)
    # but puts half its mass on the other tokens. Renormalised over the top-2 the two agree.
    teacher = torch.tensor([0.6, 0.3]).log().expand(B, T, 2)
    student = torch.tensor([1 / 3, 1 / 6]).log().expand(B, T, 2)
    want = jsd_reference(torch.tensor([0.6, 0.3, 0.1]), torch.tensor([1 / 3, 1 / 6, 0.5]), 0.5)
    assert torch.isclose(losses.topk_jsd(student, teacher, MASK), want, atol=1e-6)
    assert want > 0.1


def test_reverse_kl_estimate_and_profile():
    est = losses.reverse_kl_estimate(TEACHER, STUDENT, MASK)
    assert abs(est - float(((STUDENT - TEACHER) * MASK).sum() / MASK.sum())) < 1e-6
    profile = losses.kl_by_position(TEACHER, STUDENT, MASK, bucket=2)
    assert len(profile) == 3
    first = ((STUDENT - TEACHER) * MASK)[:, :2].sum() / MASK[:, :2].sum()
    assert abs(profile[0] - float(first)) < 1e-4


def test_full_kls_match_their_definitions_and_vanish_on_equal_distributions():
    student = torch.log_softmax(torch.randn(B, T, K), -1)
    teacher = torch.log_softmax(torch.randn(B, T, K), -1)
    n = MASK.sum()
    rkl = ((student.exp() * (student - teacher)).sum(-1) * MASK).sum() / n
    fkl = ((teacher.exp() * (teacher - student)).sum(-1) * MASK).sum() / n
    assert torch.isclose(losses.full_reverse_kl(student, teacher, MASK), rkl)
    assert torch.isclose(losses.full_forward_kl(student, teacher, MASK), fkl)
    assert losses.full_reverse_kl(student, student, MASK).abs() < 1e-6
    assert rkl > 0 and fkl > 0


def test_mask_after_first_error_keeps_the_error_and_skips_masked_positions():
    teacher = torch.zeros(3, 5)
    student = torch.zeros(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.float)
    teacher[0, 1] = -3.0  # an error at 1, and a smaller gap later that does not count
    teacher[0, 3] = -1.0
    teacher[1, 2] = -1.5  # below the threshold: no error
    teacher[2, 1] = -9.0  # at a masked position: not an error of a real token
    kept = losses.mask_after_first_error(teacher, student, mask, nats=2.0)
    assert kept.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 1, 1]]
