"""Distillation losses over student rollouts. Shapes: B rollouts x T completion positions; `mask_B_T`
is 1 on real completion tokens inside the horizon and 0 elsewhere, so masked positions never count.
"""

from __future__ import annotations

import math

import torch


def masked_mean(x_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where the mask is 1; 0 when nothing is masked in. Masked-out
    positions are dropped, not multiplied by 0, so whatever padding holds there (an inf) cannot
    turn the mean into NaN."""
    kept_B_T = torch.where(mask_B_T > 0, x_B_T * mask_B_T, torch.zeros_like(x_B_T))
    return kept_B_T.sum() / mask_B_T.sum().clamp(min=1)


def reverse_kl_advantage(
    teacher_logp_B_T: torch.Tensor,
    student_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    gamma: float = 0.0,
    clip: float | None = None,
) -> torch.Tensor:
    """A_t = log p_teacher(x_t) - log p_student(x_t), detached: the per-token reverse-KL reward.

    With gamma > 0, A_t = sum_{s >= t} gamma^(s-t) * (log p_T(x_s) - log p_S(x_s)) over real tokens;
    gamma = 0 (the default) keeps each token's own term. `clip` bounds |A_t|.
    """
    adv = (teacher_logp_B_T - student_logp_B_T).detach() * mask_B_T
    if gamma > 0:
        out = torch.zeros_like(adv)
        running = torch.zeros_like(adv[:, 0])
        for t in range(adv.shape[1] - 1, -1, -1):
            running = adv[:, t] + gamma * running * mask_B_T[:, t]
            out[:, t] = running
        adv = out * mask_B_T
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def mask_after_first_error(
    teacher_logp_B_T: torch.Tensor,
    student_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    nats: float,
) -> torch.Tensor:
    """`mask_B_T` with every position after a rollout's first error set to 0. An error is a real token
    the teacher gives at least `nats` less log-prob than the student does; it stays in the mask, so its
    negative advantage still teaches the student to avoid it. What follows it is a state the teacher's
    own solutions never visit, and training on those hurt a small student (bench/results/FINDINGS.md)."""
    return mask_up_to_first(errors(teacher_logp_B_T, student_logp_B_T, mask_B_T, nats), mask_B_T)


def mask_up_to_first(flags_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """`mask_B_T` with every position after a row's first flagged one set to 0 (that one kept)."""
    flag_B_T = flags_B_T.float()
    after_B_T = (flag_B_T.cumsum(1) - flag_B_T) > 0
    return mask_B_T * (~after_B_T).float()


def errors(
    teacher_logp_B_T: torch.Tensor,
    student_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    nats: float,
) -> torch.Tensor:
    """[B, T] bool: real tokens the teacher gives at least `nats` less log-prob than the student."""
    gap_B_T = (teacher_logp_B_T - student_logp_B_T).detach()
    return (gap_B_T <= -nats) & (mask_B_T > 0)


def policy_gradient_loss(
    logp_B_T: torch.Tensor,
    sample_logp_B_T: torch.Tensor,
    adv_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
) -> torch.Tensor:
    """-mean_t[ratio_t * A_t], ratio_t = p_now(x_t) / p_sampling(x_t), over real tokens.

    The trainer updates once per step, after sampling, so the ratio is 1 in value (up to the
    difference between the cached and the full forward) and the gradient is the plain policy
    gradient A_t * grad log p(x_t); the ratio keeps the loss right should rollouts ever lag the
    weights (several updates per batch, or asynchronous sampling).
    """
    ratio = torch.exp(logp_B_T - sample_logp_B_T.detach())
    return -masked_mean(ratio * adv_B_T, mask_B_T)


def topk_forward_kl(
    student_logp_B_T_K: torch.Tensor, teacher_logp_B_T_K: torch.Tensor, mask_B_T: torch.Tensor
) -> torch.Tensor:
    """KL(p_T || p_S) on the teacher's top-k ids, teacher renormalised over them; mean over tokens.

    `student_logp_B_T_K` are the student's full-vocabulary log-probs at the teacher's top-k ids.
    """
    p_teacher = torch.softmax(teacher_logp_B_T_K, dim=-1)
    kl = (p_teacher * (torch.log_softmax(teacher_logp_B_T_K, -1) - student_logp_B_T_K)).sum(-1)
    return masked_mean(kl, mask_B_T)


# The least mass the bucket of tokens outside the teacher's top-k is given: float32's rounding
# leaves 1 - sum(top-k) slightly negative when the top-k holds all the mass.
_TAIL_FLOOR = 1e-12


def topk_jsd(
    student_logp_B_T_K: torch.Tensor,
    teacher_logp_B_T_K: torch.Tensor,
    mask_B_T: torch.Tensor,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalised JSD(beta) over the teacher's top-k ids plus one bucket for every other token:
    beta * KL(P || M) + (1 - beta) * KL(Q || M), M = beta * P + (1 - beta) * Q (P teacher, Q student),
    for 0 < beta < 1 (at 0 or 1 it is no divergence at all; the config refuses both). Both inputs
    are full-vocabulary log-probs at those ids. The bucket makes a student pay for mass it puts
    outside the teacher's top-k (renormalising over the top-k would not see it); with k the whole
    vocabulary it is the exact JSD.
    """
    log_p = _with_tail(teacher_logp_B_T_K)
    log_q = _with_tail(student_logp_B_T_K)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), 0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    jsd = beta * kl_pm + (1 - beta) * kl_qm
    return masked_mean(jsd, mask_B_T)


def _with_tail(logp_B_T_K: torch.Tensor) -> torch.Tensor:
    """[B, T, K + 1]: the K log-probs and the log of the mass outside them."""
    rest_B_T_1 = 1 - logp_B_T_K.exp().sum(-1, keepdim=True)
    return torch.cat([logp_B_T_K, rest_B_T_1.clamp(min=_TAIL_FLOOR).log()], dim=-1)


def full_reverse_kl(
    student_logp_B_T_V: torch.Tensor, teacher_logp_B_T_V: torch.Tensor, mask_B_T: torch.Tensor
) -> torch.Tensor:
    """Exact KL(p_S || p_T) per position over the whole vocabulary, mean over real tokens. Needs the
    teacher's full distribution (an in-process teacher, or top_k = vocabulary size)."""
    kl_B_T = (student_logp_B_T_V.exp() * (student_logp_B_T_V - teacher_logp_B_T_V)).sum(-1)
    return masked_mean(kl_B_T, mask_B_T)


def full_forward_kl(
    student_logp_B_T_V: torch.Tensor, teacher_logp_B_T_V: torch.Tensor, mask_B_T: torch.Tensor
) -> torch.Tensor:
    """Exact KL(p_T || p_S) per position over the whole vocabulary, mean over real tokens."""
    return full_reverse_kl(teacher_logp_B_T_V, student_logp_B_T_V, mask_B_T)


def reverse_kl_estimate(
    teacher_logp_B_T: torch.Tensor, student_logp_B_T: torch.Tensor, mask_B_T: torch.Tensor
) -> float:
    """Sample estimate of KL(p_S || p_T) per token: mean of log p_S(x_t) - log p_T(x_t), x_t ~ p_S."""
    return float(masked_mean((student_logp_B_T - teacher_logp_B_T).detach(), mask_B_T))


def kl_by_position(
    teacher_logp_B_T: torch.Tensor,
    student_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    bucket: int = 8,
) -> list[float | None]:
    """Mean per-token reverse-KL estimate for positions [0, bucket), [bucket, 2*bucket), ...;
    None where no rollout reached that far."""
    diff = ((student_logp_B_T - teacher_logp_B_T).detach() * mask_B_T).sum(0)
    count = mask_B_T.sum(0)
    out: list[float | None] = []
    for start in range(0, diff.shape[0], bucket):
        n = float(count[start : start + bucket].sum())
        out.append(round(float(diff[start : start + bucket].sum()) / n, 5) if n else None)
    return out
