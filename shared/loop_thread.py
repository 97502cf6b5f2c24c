"""An asyncio event loop in a daemon thread, for sync code that drives async code: the sync stream
client (shared/duplex.py) and the trainer's teacher feed each run their connections on one.

    runner = LoopThread("teacher-feed")
    result = runner.call(some_coroutine())     # from any other thread; waits for the result
    runner.close()                             # cancels what is left, stops and closes the loop
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

log = logging.getLogger(__name__)

STOP_POLL_S = 0.1


class Stopped(Exception):
    """The caller's stop event was set while it waited for a call; the call was cancelled."""


class LoopThread:
    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        # A daemon: a loop left waiting (on a caller that never comes back) cannot hold up exit.
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self._thread.start()
        self._closing = False

    def call(self, coro, stop: threading.Event | None = None):
        """Run `coro` on the loop and wait for its result. Interrupted while waiting (Ctrl-C), or
        once `stop` is set (Stopped), it cancels the coroutine, which must not go on alone."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            while stop is not None and not future.done():
                if stop.wait(STOP_POLL_S):
                    raise Stopped
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Cancel the tasks left on the loop (a stream broken off mid-way leaves some), so none is
        destroyed while pending, then stop the loop and close it once its thread has ended. Tasks
        that do not end within `timeout` are left running on the loop in its daemon thread rather
        than raising here (over the error that made the caller close); a second close does
        nothing."""
        if self._closing:
            return
        self._closing = True
        try:
            asyncio.run_coroutine_threadsafe(cancel_pending(), self.loop).result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            log.warning("tasks on the %s loop did not end within %g s", self._thread.name, timeout)
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout)
        if not self._thread.is_alive():
            self.loop.close()


async def cancel_pending() -> None:
    """Cancel every other task on the running loop and wait for them to end."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
