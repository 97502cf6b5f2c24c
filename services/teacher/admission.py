"""The teacher's queue limit, shared by both backends: a request's sequences are admitted together
or refused together with QueueFull (HTTP 429), and each holds its place until its backend releases
it (the hf batcher when its batch starts, the vllm backend when vLLM has scored it) or its caller
gives it up."""

from __future__ import annotations

import asyncio

from services.teacher.backends.base import ScoreJob
from shared.errors import QueueFull


class Admission:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0  # in admitted sequences not yet released
        self.sequences = 0
        self.seconds_per_token = 1e-5  # the owner's running estimate, for Retry-After

    def admit(self, jobs: list[ScoreJob]) -> list[Place]:
        """One place per job, or QueueFull for all of them. An empty queue always admits, so a
        request within max_seq_len can never be refused forever."""
        cost = sum(len(job.input_ids) for job in jobs)
        if self.tokens and self.tokens + cost > self.max_tokens:
            raise QueueFull(
                f"queue full ({self.tokens} tokens waiting, limit {self.max_tokens})",
                retry_after=max(1.0, round(self.tokens * self.seconds_per_token, 1)),
            )
        self.tokens += cost
        self.sequences += len(jobs)
        return [Place(self, len(job.input_ids)) for job in jobs]


class Place:
    """One admitted sequence's share of the queue; released once, however often it is asked to."""

    def __init__(self, admission: Admission, tokens: int):
        self._admission = admission
        self._tokens = tokens
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._admission.tokens -= self._tokens
            self._admission.sequences -= 1

    def release_when_cancelled(self, future: asyncio.Future) -> None:
        """A caller that gives up its sequence gives up its place at once, not when a worker would
        have reached it (till then it would push other requests into 429s)."""
        future.add_done_callback(lambda f: self.release() if f.cancelled() else None)
