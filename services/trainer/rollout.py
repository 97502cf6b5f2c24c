"""Student rollouts: sampled at temperature 1 with a KV cache, cut at the step's horizon H, and handed
on in micro-batches as they finish, so the teacher scores early finishers while the rest decode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.evaluate import encode_prompts
from opd.generate import Generation, generate
from opd.models import stop_token_ids
from opd.padding import pad_id
from shared.task import Problem


@dataclass
class Rollout:
    key: int  # position in the step's batch
    problem: Problem
    prompt_ids: list[int]
    completion_ids: list[int]
    sample_logprobs: list[float]  # log-probs under the sampling policy
    finished: bool  # ended with a stop id (<eos>) inside the horizon (else cut at H)


def sample_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    samples_per_prompt: int,
    horizon: int,
    generator: torch.Generator,
    on_ready: Callable[[list[Rollout]], None],
    micro_batch: int,
    temperature: float = 1.0,
) -> list[Rollout]:
    """G samples per problem, each at most `horizon` tokens. `on_ready` gets micro-batches of
    finished rollouts (the last one may be smaller); returns all rollouts in batch order. The
    trainer samples at temperature 1 (on-policy); other temperatures are for experiments."""
    jobs = [p for p in problems for _ in range(samples_per_prompt)]
    prompts = encode_prompts(tokenizer, jobs)
    done: dict[int, Rollout] = {}
    pending: list[Rollout] = []

    def collect(rows: list[int], partial: Generation) -> None:
        for r in rows:
            n = int(partial.lengths_B[r])
            rollout = Rollout(
                key=r,
                problem=jobs[r],
                prompt_ids=prompts[r],
                completion_ids=partial.tokens_B_T[r, :n].tolist(),
                sample_logprobs=partial.logprobs_B_T[r, :n].tolist(),
                finished=bool(partial.finished_B[r]),
            )
            done[r] = rollout
            pending.append(rollout)
        while len(pending) >= micro_batch:
            on_ready(pending[:micro_batch])
            del pending[:micro_batch]

    generate(
        model,
        prompts,
        horizon,
        stop_token_ids(model.generation_config, tokenizer),
        pad_id(tokenizer),
        temperature=temperature,
        generator=generator,
        on_done=collect,
    )
    if pending:
        on_ready(list(pending))
    return [done[r] for r in range(len(jobs))]
