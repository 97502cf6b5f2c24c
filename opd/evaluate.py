"""Accuracy on held-out problems with full-length generation (never cut at a training horizon).

opd eval --model models/tiny-teacher --n 500
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.generate import generate
from opd.models import stop_token_ids
from opd.padding import pad_id
from shared.task import MAX_NEW_TOKENS, Problem, extract_answer


@dataclass
class EvalResult:
    accuracy: float  # mean accuracy over the completions (greedy accuracy, or avg@k)
    n: int  # problems
    samples: int  # completions per problem
    mean_tokens: float  # completion tokens per completion, <eos> included
    well_formed: float  # fraction of completions with an answer line
    tokens_per_s: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


class EvaluationStopped(Exception):
    """An evaluation ended early by its `stop`: it has no result."""


def encode_prompts(tokenizer: PreTrainedTokenizerBase, problems: list[Problem]) -> list[list[int]]:
    """<bos> + prompt ids for each problem."""
    return tokenizer([p.prompt for p in problems])["input_ids"]


def completion_text(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: Collection[int] | None = None
) -> str:
    """The text of a completion up to its first `stop` id (the tokenizer's <eos> unless given),
    special tokens kept: one inside the answer (an <unk> a sampled student can emit) must spoil
    it, not vanish from it. So must an id no token has (a padded vocabulary's row), which
    decodes to nothing: it reads as U+FFFD."""
    stop = {tokenizer.eos_token_id} if stop is None else set(stop)
    ends = [i for i, token in enumerate(ids) if token in stop]
    ids = ids[: ends[0]] if ends else ids
    known = len(tokenizer)
    parts, start = [], 0
    for i, token in enumerate([*ids, known]):  # the last one ends the final part
        if token >= known:
            parts.append(tokenizer.decode(ids[start:i], skip_special_tokens=False))
            start = i + 1
    return "\ufffd".join(parts)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    batch_size: int = 128,
    samples: int = 1,
    seed: int = 0,
    progress: bool = True,
    temperature: float = 0.0,
    stop: threading.Event | None = None,
) -> EvalResult:
    """Mean accuracy of `samples` completions of each problem at `temperature`: greedy accuracy by
    default, avg@k with samples=k at temperature 1. A `stop` set meanwhile ends it at the next
    batch with EvaluationStopped (a long evaluation must not hold up a run's checkpoint)."""
    generator = torch.Generator(model.device).manual_seed(seed)
    stop_at = stop_token_ids(model.generation_config, tokenizer)
    jobs = [p for p in problems for _ in range(samples)]
    correct = well_formed = tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="eval", unit="completion", disable=not progress, leave=False)
    for i in range(0, len(jobs), batch_size):
        if stop is not None and stop.is_set():
            bar.close()
            raise EvaluationStopped
        chunk = jobs[i : i + batch_size]
        out = generate(
            model,
            encode_prompts(tokenizer, chunk),
            MAX_NEW_TOKENS,
            stop_at,
            pad_id(tokenizer),
            temperature=temperature,
            generator=generator,
        )
        for problem, ids in zip(chunk, out.completions()):
            answer = extract_answer(completion_text(tokenizer, ids, stop_at))
            correct += answer == problem.answer
            well_formed += answer is not None
            tokens += len(ids)
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    total = max(len(jobs), 1)
    return EvalResult(
        accuracy=correct / total,
        n=len(problems),
        samples=samples,
        mean_tokens=tokens / total,
        well_formed=well_formed / total,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        seconds=seconds,
    )
