"""The teacher's queue limit, shared by both backends: a request's sequences are admitted together
or refused together with QueueFull (HTTP 429), and each holds its place until its backend releases
it (the hf batcher when its batch starts, the vllm backend when vLLM has scored it) or its caller
gives it up."""

from __future__ import annotations

import asyncio
import time

from services.teacher.backends.base import ScoreJob
from shared.errors import QueueFull

# How long past its Retry-After the room a refused request claims is kept for it to come back.
CLAIM_SLACK_S = 2.0


class Admission:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0  # in admitted sequences not yet released
        self.sequences = 0
        self.seconds_per_token = 1e-5  # the owner's running estimate, for Retry-After
        # (tokens, until): room claimed by the largest request refused lately. Without it, small
        # requests arriving all the time take each place as it frees, and a large one (one as
        # large as the queue needs it empty) would be refused forever.
        self._claim: tuple[int, float] | None = None

    def admit(self, jobs: list[ScoreJob]) -> list[Place]:
        """One place per job, or QueueFull for all of them. A request goes in when the queue has
        room for it beside what a refused request claims; the claimant itself (or one as large),
        on an empty queue whatever its size, so no request within max_seq_len is refused forever:
        it comes back (a retry, a waiting stream frame) and the queue drains for it."""
        cost = sum(len(job.input_ids) for job in jobs)
        now = time.monotonic()
        if self._claim is not None and (self._claim[1] <= now or cost >= self._claim[0]):
            self._claim = None  # lapsed, or this is the claimant (or as large): the usual rule
        claimed = self._claim[0] if self._claim is not None else 0
        fits = self.tokens + claimed + cost <= self.max_tokens
        if not fits and (self.tokens or claimed):
            retry_after = max(1.0, round(self.tokens * self.seconds_per_token, 1))
            if self._claim is None:
                self._claim = (cost, now + retry_after + CLAIM_SLACK_S)
            raise QueueFull(
                f"queue full ({self.tokens} tokens waiting, limit {self.max_tokens})",
                retry_after=retry_after,
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
