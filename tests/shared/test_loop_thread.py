"""The loop thread runs coroutines for other threads, passes their errors on, and leaves nothing
pending or running when closed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from shared.loop_thread import LoopThread, Stopped


async def double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


async def fail() -> None:
    raise ValueError("from the loop")


def test_call_returns_the_result_and_raises_the_error():
    runner = LoopThread("test")
    try:
        assert runner.call(double(21)) == 42
        with pytest.raises(ValueError, match="from the loop"):
            runner.call(fail())
    finally:
        runner.close()


def test_close_cancels_what_is_left_and_closes_the_loop():
    runner = LoopThread("test")
    cancelled = []

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def start() -> asyncio.Task:
        return asyncio.ensure_future(forever())

    task = runner.call(start())
    runner.close()
    assert cancelled == [True] and task.cancelled()
    assert runner.loop.is_closed()


def test_an_interrupted_wait_cancels_the_coroutine(monkeypatch):
    runner = LoopThread("test")
    started, cancelled = threading.Event(), threading.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def interrupted(self, timeout=None):  # as Ctrl-C while the caller waits for the result
        started.wait(5)
        raise KeyboardInterrupt

    monkeypatch.setattr(concurrent.futures.Future, "result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.call(slow())
    monkeypatch.undo()
    assert cancelled.wait(5)  # by the call itself, before anything closes the loop
    runner.close()


def test_a_stop_while_waiting_cancels_the_coroutine_and_says_so():
    runner = LoopThread("test")
    stop, cancelled = threading.Event(), threading.Event()

    async def slow() -> None:
        stop.set()  # as a stop that comes while the caller waits
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        with pytest.raises(Stopped):
            runner.call(slow(), stop=stop)
        assert cancelled.wait(5)
        assert runner.call(double(2), stop=threading.Event()) == 4  # unset: waits for the result
    finally:
        runner.close()


def test_close_does_not_raise_over_a_task_slow_to_end_and_a_second_close_does_nothing():
    # Raising from close() would replace the error that made its caller close the loop.
    runner = LoopThread("test")

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(1)  # ignores its first cancel for a while
            raise

    async def start() -> asyncio.Task:
        return asyncio.ensure_future(stubborn())

    runner.call(start())
    runner.close(timeout=0.1)
    runner.close(timeout=0.1)
