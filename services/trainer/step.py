"""One distillation update's tensors: the student's log-probs on its own rollouts, the teacher's from
its scores, and the configured loss (from services.trainer.losses) over them, backpropagated one
micro-batch at a time as the teacher's scores arrive."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opd.padding import right_pad
from services.trainer import losses
from services.trainer.config import RunConfig
from services.trainer.rollout import Rollout
from shared.protocol import SequenceScore

# A teacher may call a token impossible (-inf; the vllm backend reports NaN so; a JSON answer says
# LOWEST_LOGPROB, -9999). Every log-prob is floored at a very bad but finite one, so the loss and
# its gradient stay finite and sane rather than turning the student's weights into NaN or one
# token's advantage into -9999, and an impossible token is never scored above a merely unlikely one.
IMPOSSIBLE_LOGP = -100.0


def finite_logprobs(logp: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(logp, nan=IMPOSSIBLE_LOGP, posinf=0.0).clamp(min=IMPOSSIBLE_LOGP)


@dataclass
class MicroBatchLoss:
    loss: torch.Tensor  # mean over the tokens it trains on
    tokens: int  # completion tokens trained on
    cut_tokens: int  # rollout tokens left out for following a teacher-flagged error
    teacher_B_T: torch.Tensor  # the teacher's log-prob of each rollout token (0 past its end)
    student_B_T: torch.Tensor  # the student's, detached
    mask_B_T: torch.Tensor  # 1 on every rollout token, trained on or cut

    @property
    def reverse_kl(self) -> float:
        """Per-token estimate of KL(student || teacher) on every rollout token, cut or not."""
        return losses.reverse_kl_estimate(self.teacher_B_T, self.student_B_T, self.mask_B_T)


@dataclass
class StepLoss:
    loss: float  # mean over the step's trained tokens
    reverse_kl: float  # per-token estimate of KL(student || teacher) on the rollouts
    kl_profile: list[float | None]  # the same by position bucket of 8 tokens
    tokens: int
    cut_tokens: int


def student_logprobs(model, rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_B_T_V, mask_B_T): the student's log-softmax at each completion position, with grad.

    Sequences are right-padded with no attention mask: causal attention keeps padding invisible.
    """
    seqs = [r.prompt_ids + r.completion_ids for r in rollouts]
    ids_B_L = right_pad(seqs, 0).to(model.device)
    logits_B_L_V = model(input_ids=ids_B_L).logits
    width = max(len(r.completion_ids) for r in rollouts)
    t_T = torch.arange(width)
    # Completion token t of row b is predicted at position n_prompt_b - 1 + t.
    n_prompt_B = torch.tensor([len(r.prompt_ids) for r in rollouts])
    n_comp_B = torch.tensor([len(r.completion_ids) for r in rollouts])
    pos_B_T = (n_prompt_B[:, None] - 1 + t_T[None, :]).clamp(max=ids_B_L.shape[1] - 1)
    mask_B_T = (t_T[None, :] < n_comp_B[:, None]).float()
    vocab = logits_B_L_V.shape[-1]
    # Only the completion rows: the prompt's rows never need a log-softmax. Expanded after the
    # move: a copy to another device would make the [B, T, V] view of indices a real tensor.
    index_B_T_V = pos_B_T.to(model.device)[..., None].expand(-1, -1, vocab)
    logits_B_T_V = logits_B_L_V.gather(1, index_B_T_V)
    return torch.log_softmax(logits_B_T_V.float(), dim=-1), mask_B_T.to(model.device)


def sampled_logprobs(logp_B_T_V: torch.Tensor, rollouts: list[Rollout]) -> torch.Tensor:
    """[B, T]: the log-prob each distribution gave the rollout's own token (0 past its end)."""
    width = logp_B_T_V.shape[1]
    tokens_B_T = right_pad([r.completion_ids for r in rollouts], 0, width=width)
    lengths_B = torch.tensor([len(r.completion_ids) for r in rollouts])
    real_B_T = torch.arange(width)[None, :] < lengths_B[:, None]
    picked_B_T = logp_B_T_V.gather(2, tokens_B_T.to(logp_B_T_V.device)[..., None]).squeeze(-1)
    return torch.where(real_B_T.to(picked_B_T.device), picked_B_T, 0.0)


def accumulate_gradients(
    model,
    scored: Iterable[tuple[list[Rollout], dict[int, SequenceScore]]],
    cfg: RunConfig,
) -> StepLoss:
    """Backpropagates the step's loss one scored micro-batch at a time, so the student trains on the
    first ones while the teacher still scores the rest, and holds one micro-batch's activations at a
    time. The gradient is the whole batch's: each micro-batch's mean is weighted by its token count
    and the sum divided by the step's count (which --cut-at-error makes known only at the end)."""
    parts = []
    for rollouts, scores in scored:
        part = distillation_loss(model, rollouts, scores, cfg)
        (part.loss * part.tokens).backward()
        parts.append(part)
    tokens = sum(p.tokens for p in parts)
    for param in model.parameters():
        if param.grad is not None:
            param.grad.div_(max(tokens, 1))
    teacher_B_T, student_B_T, mask_B_T = (
        stacked([getattr(p, name) for p in parts])
        for name in ("teacher_B_T", "student_B_T", "mask_B_T")
    )
    return StepLoss(
        loss=sum(float(p.loss.detach()) * p.tokens for p in parts) / max(tokens, 1),
        reverse_kl=losses.reverse_kl_estimate(teacher_B_T, student_B_T, mask_B_T),
        kl_profile=losses.kl_by_position(teacher_B_T, student_B_T, mask_B_T),
        tokens=tokens,
        cut_tokens=sum(p.cut_tokens for p in parts),
    )


def stacked(rows_B_T: list[torch.Tensor]) -> torch.Tensor:
    """Micro-batches' [B_i, T_i] tensors as one [sum B_i, max T_i], zero-padded on the right."""
    width = max(t.shape[1] for t in rows_B_T)
    return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in rows_B_T])


def distillation_loss(
    model, rollouts: list[Rollout], scores: dict[int, SequenceScore], cfg: RunConfig
) -> MicroBatchLoss:
    logp_B_T_V, mask_B_T = student_logprobs(model, rollouts)
    width = mask_B_T.shape[1]
    device = logp_B_T_V.device
    student_B_T = sampled_logprobs(logp_B_T_V, rollouts)
    teacher_B_T = finite_logprobs(
        right_pad([scores[r.key].logprobs for r in rollouts], 0.0, torch.float32, width)
    ).to(device)
    loss_mask_B_T = mask_B_T
    if cfg.cut_at_error is not None:
        loss_mask_B_T = losses.mask_after_first_error(
            teacher_B_T, student_B_T, mask_B_T, cfg.cut_at_error
        )
    if cfg.loss == "reverse_kl":
        sample_B_T = right_pad([r.sample_logprobs for r in rollouts], 0.0, torch.float32, width)
        adv_B_T = losses.reverse_kl_advantage(
            teacher_B_T, student_B_T, loss_mask_B_T, gamma=cfg.gamma, clip=cfg.adv_clip
        )
        loss = losses.policy_gradient_loss(
            student_B_T, sample_B_T.to(device), adv_B_T, loss_mask_B_T
        )
    else:
        picked = [scores[r.key] for r in rollouts]
        topk_ids = right_pad([s.topk_ids[:, : cfg.top_k] for s in picked], 0, torch.long, width)
        topk_lp = finite_logprobs(
            right_pad([s.topk_logprobs[:, : cfg.top_k] for s in picked], 0.0, torch.float32, width)
        )
        # A larger teacher vocabulary's padded rows (Qwen2.5-7B's 152,064 ids over 0.5B's
        # 151,936) are ids no student has: they leave the top-k (JSD's tail bucket keeps their
        # mass), as the student can put none there.
        vocab = logp_B_T_V.shape[-1]
        beyond = (topk_ids >= vocab).to(device)
        topk_ids, topk_lp = topk_ids.clamp(max=vocab - 1), topk_lp.to(device)
        student_topk = logp_B_T_V.gather(2, topk_ids.to(device)).masked_fill(
            beyond, IMPOSSIBLE_LOGP
        )
        topk_lp = topk_lp.masked_fill(beyond, IMPOSSIBLE_LOGP)
        if cfg.loss == "forward_kl_topk":
            loss = losses.topk_forward_kl(student_topk, topk_lp, loss_mask_B_T)
        else:
            loss = losses.topk_jsd(student_topk, topk_lp, loss_mask_B_T, cfg.jsd_beta)
    # The KL is measured on every rollout token, whatever the loss trained on.
    return MicroBatchLoss(
        loss=loss,
        tokens=int(loss_mask_B_T.sum()),
        cut_tokens=int((mask_B_T - loss_mask_B_T).sum()),
        teacher_B_T=teacher_B_T.detach().cpu(),
        student_B_T=student_B_T.detach().cpu(),
        mask_B_T=mask_B_T.detach().cpu(),
    )
