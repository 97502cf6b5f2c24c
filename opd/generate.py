"""Batched decoding with a KV cache: greedy for evaluation, sampling for on-policy rollouts.

A hand-written loop rather than `model.generate`: it is faster for tiny models (less per-step work) and
returns the sampled tokens' log-probs, which the trainer needs as the behaviour policy's log-probs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from opd.padding import left_pad


@dataclass
class Generation:
    """Completions of one batch; row b holds `lengths[b]` real tokens, then padding."""

    tokens_B_T: torch.Tensor  # int64, completion tokens (eos included when it was produced)
    logprobs_B_T: torch.Tensor  # float32, log-prob of each token under the sampling distribution
    lengths_B: torch.Tensor  # int64, tokens in each completion
    finished_B: (
        torch.Tensor
    )  # bool, True where the completion ended with a stop id (not cut at the limit)

    def completions(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens_B_T, self.lengths_B)]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop: int | Collection[int],
    pad_id: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    on_done: Callable[[list[int], Generation], None] | None = None,
) -> Generation:
    """Decode up to `max_new_tokens` per prompt, each ending at its first `stop` id (kept);
    temperature 0 is greedy, otherwise sampling at T.

    `on_done(rows, partial)` is called as rows finish (eos, or the token limit at the end) with the
    generation so far, so a caller can hand finished completions on while the rest still decode.
    """
    ids_B_P, mask_B_P = left_pad(prompts, pad_id)
    batch = len(prompts)
    if not batch:  # nothing to decode (a model's forward refuses an empty batch)
        none = torch.zeros((0, 0))
        return Generation(none.long(), none, torch.zeros(0).long(), torch.zeros(0).bool())
    device = model.device
    ids_B_P, mask_B_P = ids_B_P.to(device), mask_B_P.to(device)
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    stop_S = torch.tensor([stop] if isinstance(stop, int) else sorted(stop), device=device)
    cache = DynamicCache()
    mask = mask_B_P
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids = ids_B_P
    kwargs = _step_kwargs(model, cache)  # inspects the signature: once, not per token
    for t in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, **kwargs)
        logits_B_V = out.logits[:, -1, :].float()
        next_B, logprob_B = _pick(logits_B_V, temperature, generator)
        live = ~finished
        tokens[live, t] = next_B[live]
        logprobs[live, t] = logprob_B[live]
        lengths += live.long()
        newly_done = live & torch.isin(next_B, stop_S)
        finished |= newly_done
        if on_done is not None and bool(newly_done.any()):
            on_done(
                newly_done.nonzero().flatten().tolist(),
                Generation(tokens, logprobs, lengths, finished),
            )
        if bool(finished.all()):
            break
        step_ids = next_B.unsqueeze(1)
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
    width = int(lengths.max()) if batch else 0
    out = Generation(
        tokens[:, :width].cpu(), logprobs[:, :width].cpu(), lengths.cpu(), finished.cpu()
    )
    if on_done is not None and not bool(finished.all()):
        on_done((~out.finished_B).nonzero().flatten().tolist(), out)  # cut at the limit
    return out


def _step_kwargs(model: PreTrainedModel, cache: DynamicCache) -> dict:
    params = inspect.signature(model.forward).parameters
    # transformers renamed `past_key_values` to `cache` in 5.2x; accept both releases.
    kwargs = {"use_cache": True, "cache" if "cache" in params else "past_key_values": cache}
    if "logits_to_keep" in params:
        # The prompt's pass needs the last position's logits only: all of them would be
        # batch x prompt x vocabulary floats (37 GB for 4,096 rows of 30 tokens at 152k).
        kwargs["logits_to_keep"] = 1
    return kwargs


def _pick(
    logits_B_V: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if temperature == 0.0:
        logp_B_V = torch.log_softmax(logits_B_V, dim=-1)
        next_B = logp_B_V.argmax(dim=-1)
    else:
        logp_B_V = torch.log_softmax(logits_B_V / temperature, dim=-1)
        next_B = torch.multinomial(logp_B_V.exp(), 1, generator=generator).squeeze(1)
    return next_B, logp_B_V.gather(1, next_B.unsqueeze(1)).squeeze(1)
