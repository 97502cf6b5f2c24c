"""Dynamic batching: concurrent requests are coalesced into forward passes under a token budget.

Requests put their jobs on a queue; one worker task takes everything pending, sorts it by length (so
sequences of similar length share a batch and padding stays small), packs batches whose padded size
(rows x longest row) fits `max_batch_tokens`, and runs each in a worker thread so the event loop keeps
serving. A failed batch is run again one sequence at a time, so a failure reaches only the requests
whose own sequences fail; a request whose client went away is dropped without blocking anyone else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from services.teacher.admission import Admission, Place
from services.teacher.backends.base import ScoreJob
from services.teacher.metrics import TeacherMetrics
from shared.errors import NotReady
from shared.protocol import SequenceScore

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job: ScoreJob
    future: asyncio.Future
    place: Place  # in the queue, given up when its batch starts or its caller goes


def pack_batches(items: list, max_batch_tokens: int, length: Callable[[object], int]) -> list[list]:
    """Group items, shortest first, so that len(batch) * longest <= max_batch_tokens (or one item)."""
    batches: list[list] = []
    current: list = []
    for item in sorted(items, key=length):
        # Sorted ascending, so the newest item is the longest in the batch.
        if current and (len(current) + 1) * length(item) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(item)
    if current:
        batches.append(current)
    return batches


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[list[ScoreJob]], list[SequenceScore]],
        max_batch_tokens: int,
        max_queue_tokens: int,
        metrics: TeacherMetrics | None = None,
    ):
        self._run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self._metrics = metrics
        # By future: a request given up leaves at once with its ids, not when the worker reaches it
        # (else a client posting and hanging up could pile up data the queue limit no longer counts).
        self._pending: dict[asyncio.Future, _Pending] = {}
        self._taken: list[_Pending] = []  # taken by the worker, not all finished yet
        self._admission = Admission(max_queue_tokens)  # jobs submitted and not yet started
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        # One thread: batches run one after another; torch uses its own threads inside.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for item in [*self._pending.values(), *self._taken]:
            if not item.future.done():
                item.future.set_exception(NotReady("the teacher is shutting down"))
        self._pending, self._taken = {}, []
        self._executor.shutdown(wait=False)

    def depth(self) -> int:
        return self._admission.sequences

    def admit(self, jobs: list[ScoreJob]) -> list[asyncio.Future]:
        """Queue `jobs` together, or refuse them all (QueueFull); one future per job, in order.
        Cancelling a future drops its job if it has not started, and frees its place at once."""
        places = self._admission.admit(jobs)
        loop = asyncio.get_running_loop()
        items = [_Pending(job, loop.create_future(), place) for job, place in zip(jobs, places)]
        for item in items:
            item.place.release_when_cancelled(item.future)
            item.future.add_done_callback(self._drop_if_cancelled)
            self._pending[item.future] = item
        self._wakeup.set()
        return [item.future for item in items]

    def _drop_if_cancelled(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self._pending.pop(future, None)

    async def submit(self, jobs: list[ScoreJob]) -> list[SequenceScore]:
        futures = self.admit(jobs)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            # The client went away or a sibling failed: drop what has not started yet.
            for future in futures:
                future.cancel()

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._taken, self._pending = list(self._pending.values()), {}
            for batch in pack_batches(
                self._taken, self.max_batch_tokens, lambda i: len(i.job.input_ids)
            ):
                await self._run(batch)
            self._taken = []

    async def _run(self, batch: list[_Pending]) -> None:
        for item in batch:
            item.place.release()
        live = [i for i in batch if not i.future.done()]
        if live:
            await self._score(live)

    async def _score(self, live: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            scores = await loop.run_in_executor(
                self._executor, self._run_batch, [i.job for i in live]
            )
            if len(scores) != len(live):  # a backend's bug fails the requests, not hangs them
                raise RuntimeError(f"the backend scored {len(scores)} of {len(live)} sequences")
        except Exception as exc:  # the request's own handler logs it, with the traceback
            if len(live) > 1:  # one sequence's failure must not fail the others batched with it
                log.warning("a batch of %d failed (%r); scoring them one at a time", len(live), exc)
                for item in live:
                    if not item.future.done():  # a sibling's failure may have cancelled it
                        await self._score([item])
            elif not live[0].future.done():
                live[0].future.set_exception(exc)
            return
        elapsed = loop.time() - started
        tokens = sum(len(i.job.input_ids) for i in live)
        estimate = self._admission.seconds_per_token
        self._admission.seconds_per_token = 0.8 * estimate + 0.2 * elapsed / max(tokens, 1)
        if self._metrics is not None:
            self._metrics.observe_batch(len(live), tokens, elapsed)
        for item, score in zip(live, scores):
            item.job.compute_s = elapsed * len(item.job.input_ids) / max(tokens, 1)
            if not item.future.done():
                item.future.set_result(score)
