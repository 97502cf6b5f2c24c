"""The dynamic batcher: token budget, coalescing of concurrent requests, and a failure reaching only
the requests that cause it."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import numpy as np
import pytest

from services.teacher.backends.base import ScoreJob
from services.teacher.batcher import Batcher, pack_batches
from shared.errors import NotReady, QueueFull
from shared.protocol import SequenceScore


def test_pack_batches_respects_the_budget_and_keeps_everything():
    lengths = [3, 50, 7, 7, 20, 1, 64, 33, 12]
    batches = pack_batches(lengths, 64, length=lambda x: x)
    assert sorted(x for b in batches for x in b) == sorted(lengths)
    for batch in batches:
        assert len(batch) * max(batch) <= 64 or len(batch) == 1


def job(n: int) -> ScoreJob:
    return ScoreJob(input_ids=list(range(n)), n_prompt=1)


class Recorder:
    """A run_batch that records batch sizes; the first batch waits for a gate, so others queue up."""

    def __init__(self, poison: frozenset[int] = frozenset()):
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.poison = poison  # sequence lengths that make their whole batch fail

    def __call__(self, jobs):
        if not self.sizes:
            self.gate.wait(timeout=10)
        self.sizes.append(len(jobs))
        if any(len(j.input_ids) in self.poison for j in jobs):
            raise RuntimeError("backend exploded")
        return [
            SequenceScore(logprobs=np.full(j.n_scored, len(j.input_ids), np.float32)) for j in jobs
        ]


async def submit_while_held(batcher: Batcher, recorder: Recorder, n: int):
    first = asyncio.create_task(batcher.submit([job(4)]))
    await asyncio.sleep(0.05)  # the first batch is now running and blocked on the gate
    rest = [asyncio.create_task(batcher.submit([job(5 + i)])) for i in range(n)]
    await asyncio.sleep(0.05)
    recorder.gate.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_concurrent_requests_are_coalesced_and_answered_in_order():
    async def run():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_tokens=1000, max_queue_tokens=10_000)
        batcher.start()
        results = await submit_while_held(batcher, recorder, 6)
        await batcher.close()
        return recorder, results

    recorder, results = asyncio.run(run())
    assert recorder.sizes == [1, 6]  # the six queued requests ran as one batch
    for i, result in enumerate(results[1:]):
        assert result[0].logprobs[0] == 5 + i  # each request got its own sequence's answer


def test_a_failed_batch_fails_only_the_request_that_fails_alone():
    async def run():
        recorder = Recorder(poison=frozenset({6}))
        batcher = Batcher(recorder, max_batch_tokens=1000, max_queue_tokens=10_000)
        batcher.start()
        results = await submit_while_held(batcher, recorder, 3)  # lengths 4, then 5 6 7 together
        after = await batcher.submit([job(3)])  # the worker survives and serves the next request
        await batcher.close()
        return recorder.sizes, results, after

    sizes, results, after = asyncio.run(run())
    assert sizes == [1, 3, 1, 1, 1, 1]  # the batch of three failed, then each was scored alone
    assert isinstance(results[2], RuntimeError)
    assert [r[0].logprobs[0] for r in (results[0], results[1], results[3])] == [4, 5, 7]
    assert after[0].logprobs[0] == 3


def test_a_backend_that_drops_a_score_fails_the_request_instead_of_hanging_it():
    def drops_the_last(jobs):
        return [SequenceScore(logprobs=np.zeros(j.n_scored, np.float32)) for j in jobs[:-1]]

    async def run():
        batcher = Batcher(drops_the_last, max_batch_tokens=1000, max_queue_tokens=10_000)
        batcher.start()
        try:
            return await asyncio.wait_for(batcher.submit([job(4), job(5)]), timeout=10)
        finally:
            await batcher.close()

    with pytest.raises(RuntimeError, match="scored 0 of 1 sequences"):
        asyncio.run(run())


def test_siblings_of_a_failed_sequence_are_not_run_after_its_request_failed():
    async def run():
        recorder = Recorder(poison=frozenset({3}))
        recorder.gate.set()
        batcher = Batcher(recorder, max_batch_tokens=1000, max_queue_tokens=10_000)
        batcher.start()
        # One request of six sequences; the shortest (run first when retried alone) fails.
        result = await asyncio.gather(
            batcher.submit([job(n) for n in range(3, 9)]), return_exceptions=True
        )
        await asyncio.sleep(0.1)  # let the worker finish whatever it still runs
        await batcher.close()
        return recorder.sizes, result

    sizes, [result] = asyncio.run(run())
    assert isinstance(result, RuntimeError)
    # The request failed with its first sequence, so the worker drops the rest instead of
    # running each alone (at most the one already handed to the executor runs).
    assert sizes[:2] == [6, 1] and len(sizes) <= 3


def test_budget_splits_batches():
    async def run():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_tokens=20, max_queue_tokens=10_000)
        batcher.start()
        await submit_while_held(batcher, recorder, 4)  # lengths 5..8: 2 fit per batch of 20
        await batcher.close()
        return recorder.sizes

    assert asyncio.run(run()) == [1, 2, 2]


@pytest.mark.parametrize("cancel_first", [True, False])
def test_cancelled_request_is_dropped_without_blocking_others(cancel_first):
    async def run():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_tokens=1000, max_queue_tokens=10_000)
        batcher.start()
        held = asyncio.create_task(batcher.submit([job(4)]))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(batcher.submit([job(6)]))
        kept = asyncio.create_task(batcher.submit([job(7)]))
        await asyncio.sleep(0.01)
        (gone if cancel_first else kept).cancel()
        recorder.gate.set()
        await held
        survivor = kept if cancel_first else gone
        result = await survivor
        await batcher.close()
        return result, recorder.sizes

    result, sizes = asyncio.run(run())
    assert sizes == [1, 1]  # the cancelled job never reached the model
    assert result[0].logprobs[0] == (7 if cancel_first else 6)


def test_close_fails_the_requests_it_took_but_did_not_finish():
    async def run():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_tokens=1000, max_queue_tokens=10_000)
        batcher.start()
        running = asyncio.create_task(batcher.submit([job(4)]))
        await asyncio.sleep(0.05)  # taken by the worker, and held at the gate
        await batcher.close()
        recorder.gate.set()
        return await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 5)

    (result,) = asyncio.run(run())
    assert isinstance(result, NotReady)


def test_a_request_given_up_frees_its_place_in_the_queue_at_once():
    """Its sequences are skipped when the worker reaches them; until then they must not push other
    requests (a client retrying after its own timeout, say) into 429s."""

    async def run():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_tokens=1000, max_queue_tokens=200)
        batcher.start()
        running = asyncio.create_task(batcher.submit([job(100)]))
        await asyncio.sleep(0.05)  # taken by the worker and held at the gate: its place is free
        gone = asyncio.create_task(batcher.submit([job(200)]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="200 tokens waiting, limit 200"):
            batcher.admit([job(50)])
        gone.cancel()
        await asyncio.sleep(0.01)
        assert batcher.depth() == 0
        retried = asyncio.create_task(batcher.submit([job(50)]))
        recorder.gate.set()
        await running
        result = await retried
        await batcher.close()
        return result, recorder.sizes

    result, sizes = asyncio.run(run())
    assert result[0].logprobs[0] == 50 and sizes == [1, 1]  # the given-up job never ran


def test_a_request_given_up_leaves_the_queue_with_its_data_at_once():
    """Its place is free at once, so its ids must go too: a client posting and hanging up while a
    long batch runs would otherwise pile up data that the queue limit no longer counts."""

    async def run():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_tokens=1000, max_queue_tokens=200)
        batcher.start()
        running = asyncio.create_task(batcher.submit([job(100)]))
        await asyncio.sleep(0.05)  # held at the gate
        given_up = job(150)
        gone = weakref.ref(given_up)
        request = asyncio.create_task(batcher.submit([given_up]))
        await asyncio.sleep(0.01)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        await asyncio.sleep(0.01)  # the cancelled future's callbacks run
        del given_up, request
        gc.collect()
        still_held = gone() is not None
        recorder.gate.set()
        await running
        await batcher.close()
        return still_held

    assert not asyncio.run(run())
