"""The one interface every teacher backend implements, and the unit of work it scores."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass

from shared.protocol import SequenceScore


@dataclass
class ScoreJob:
    """One sequence to score: the prompt, then the completion tokens to score (already cut to H)."""

    input_ids: list[int]  # prompt + scored completion tokens, length <= max_seq_len
    n_prompt: int  # the first n_prompt ids are context only
    top_k: int = 0
    candidate_ids: list[list[int]] | None = None  # one list per scored position
    temperature: float = 1.0
    want_ranks: bool = False  # also the vocabulary rank of each scored token (OpenAI dialect)
    # Sample a token from the last scored position at this temperature (OpenAI max_tokens=1).
    sample_temperature: float | None = None
    # Forward time attributed to this job, set by the hf backend's batcher; the vllm backend leaves
    # it 0 (unknown): its scheduler runs many requests in each forward, so none has a time of its own.
    compute_s: float = 0.0

    @property
    def n_scored(self) -> int:
        return len(self.input_ids) - self.n_prompt


@dataclass
class BackendInfo:
    model: str
    backend: str
    dtype: str
    device: str
    vocab_size: int  # rows of the output layer: valid token ids are 0 .. vocab_size-1
    max_seq_len: int
    tokenizer_fingerprint: str
    # Where a generated token ends a completion, as vLLM ends one: the tokenizer's eos and every
    # eos id the model's generation_config.json lists (Qwen lists <|endoftext|> beside <|im_end|>).
    stop_token_ids: frozenset[int] = frozenset()


class Backend(ABC):
    """Loads a model and scores jobs. `load` runs once in a worker thread before `start`."""

    info: BackendInfo
    tokenizer: object  # the model's HF tokenizer (decoding token text for the OpenAI dialect)

    @abstractmethod
    def load(self) -> BackendInfo: ...

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (batchers, engines) on the running event loop."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work; pending requests fail with NotReady."""

    @abstractmethod
    async def score(self, jobs: list[ScoreJob]) -> list[SequenceScore]:
        """Scores for `jobs`, in order. Concurrent calls may be batched together."""

    def score_each(self, jobs: list[ScoreJob]) -> list[Awaitable[SequenceScore]]:
        """One awaitable score per job, in order, each done as soon as its job is scored. A backend
        with a bounded queue queues them together (all of them, or QueueFull); this default, for
        backends without one, scores each on its own. Cancelling an awaitable drops its job if it
        has not started."""

        async def one(job: ScoreJob) -> SequenceScore:
            [score] = await self.score([job])
            return score

        return [asyncio.ensure_future(one(job)) for job in jobs]

    def queue_depth(self) -> int:
        """Sequences waiting to be scored (for /metrics)."""
        return 0
