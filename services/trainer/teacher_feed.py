"""Streams a step's rollouts to the teacher replicas while the student is still generating.

Each step opens up to `streams_per_url` `/score/stream` calls (lanes) per teacher URL; every
micro-batch becomes one frame, sent to the lane with the fewest sequences awaiting scores. More than
one lane per URL is for a load balancer in front of several replicas: it keeps each stream on one
replica, so one lane would give a step's frames all to one. Backpressure: at most
`frames_in_flight` frames per lane await scores in all (a replica that is down leaves its share to
the others), and as many wait in a bounded queue; beyond that `put` blocks the generating thread.
If a replica dies mid-step, the sequences it had not answered are scored again elsewhere at once, a
frame per request; so is a sequence it could not score (its siblings still come on the stream), and so
are those of a lane with a frame open that has answered nothing for HEDGE_AFTER_S while others
answered (its replica may hang, mid-frame too: the client's timeout is minutes). Each
rollout's first score is taken, exactly once, and the step ends when every rollout has one.

    feed = TeacherFeed(urls, api_key, streams_per_url=1)  # one per run; owns an event-loop thread
    step = feed.begin(max_positions=H, top_k=0)
    step.put(micro_batch)                          # from the generating thread, as rollouts finish
    for rollouts, scores in step.scored_frames():  # after the last put: each micro-batch once scored
        ...
    scores, stats = step.finish()                  # blocks until every rollout has its score
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from services.trainer.rollout import Rollout
from shared.client import AsyncTeacherClient, TeacherTimedOut
from shared.errors import FingerprintMismatch, ServerError, TeacherError
from shared.loop_thread import LoopThread, cancel_pending
from shared.protocol import ScoreRequest, SequenceScore

log = logging.getLogger(__name__)

# A frame a replica has not answered this long, while another replica has answered since it was
# sent, is scored elsewhere too (a hung replica would otherwise hold the step for the client's
# timeout).
HEDGE_AFTER_S = 10.0


@dataclass
class FeedStats:
    # The teacher's work for this step, every answer counted, a second answer for a rollout too
    # (scored again after a replica failed or stalled): what the scoring cost, not what trains.
    compute_s: float = 0.0  # forward time the stream reports; /score (rescoring) reports none
    scored_tokens: int = 0
    rescored: int = 0  # sequences scored again after a replica failed or stalled
    wait_s: float = 0.0  # time scored_frames() blocked its caller, waiting for scores
    put_wait_s: float = 0.0  # time put() blocked the generating thread (backpressure)


def _replica_fault(error: dict) -> bool:
    """Whether a refused frame is the replica's trouble (a failed forward, overload, shutting down),
    which scoring elsewhere can get past, rather than a bad frame, which it cannot."""
    code = error.get("code", 500)
    return code >= 500 or code == 429


class TeacherStreamError(TeacherError):
    """The teacher refused a frame (a bug on our side: frames are built valid)."""


class StepAbandoned(Exception):
    """The step was given up on before every rollout had its score (see StepFeed.abandon)."""


class _Lane:
    """One /score/stream call to one teacher URL during one step."""

    def __init__(self, url: str):
        self.url = url
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sent: list[int] = []  # global frame ids, in the order this stream carries them
        # Of those, the frames it has not wholly answered, and how many of their sequences it
        # owes an answer (a score, or an error that sends the sequence elsewhere).
        self.open: dict[int, int] = {}
        self.task: asyncio.Task | None = None
        self.failed = False
        self.answered_at = float("-inf")  # loop time of its latest score

    @property
    def awaiting(self) -> int:
        """Sequences it owes an answer."""
        return sum(self.open.values())

    def answered(self, frame: int) -> None:
        """It answered one more of `frame`'s sequences."""
        if frame in self.open:
            self.open[frame] -= 1
            if not self.open[frame]:
                del self.open[frame]


def stalled_frames(
    lane: _Lane, others_answered_at: float, sent_at: dict[int, float], now: float
) -> list[int]:
    """The open frames of `lane` that have waited over HEDGE_AFTER_S since it was last heard from
    (its latest answer, or the frame's sending if later), while another lane has answered since:
    a replica that hangs mid-frame, after answering some of its sequences, is stalled too."""
    stalled = []
    for f in sorted(lane.open):
        heard = max(lane.answered_at, sent_at[f])
        if heard < others_answered_at and now - heard > HEDGE_AFTER_S:
            stalled.append(f)
    return stalled


class StepFeed:
    def __init__(self, feed: TeacherFeed, max_positions: int | None, top_k: int):
        self._feed = feed
        self._loop = feed.loop
        self.max_positions = max_positions
        self.top_k = top_k
        self._lane_keys = [
            (url, slot) for slot in range(feed.streams_per_url) for url in feed.client.urls
        ]
        self._max_in_flight = feed.frames_in_flight * len(self._lane_keys)
        self._inbox: asyncio.Queue = asyncio.Queue(maxsize=self._max_in_flight)
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._missing: dict[int, int] = {}  # frame -> its sequences without a score yet
        self._streams: list[asyncio.Task] = []  # every lane's task, replaced lanes' too
        self._rescues: list[asyncio.Task] = []  # failed lanes' frames, scored again elsewhere
        self._timed_out: dict[int, TeacherTimedOut] = {}  # frames whose rescue got no answer
        self._sent_at: dict[int, float] = {}  # loop time each frame went to its lane
        self._answered = asyncio.Event()  # set whenever a sequence is scored or a lane fails
        self._ended = asyncio.Event()  # _run has returned or failed: nothing takes from the inbox
        # A frame the teacher refused, or an answer from a replica with another tokenizer: what
        # scoring elsewhere cannot get past, so the step fails by name. Or StepAbandoned.
        self._refused: Exception | None = None
        self.frames: list[list[Rollout]] = []
        self._rollouts = 0  # in self.frames
        self.scores: dict[int, SequenceScore] = {}
        self.stats = FeedStats()
        # Guards frames, scores and _missing, which the loop's thread writes and scored_frames()
        # reads.
        self._changed = threading.Condition()
        self._closing = False  # the caller has sent the end of input
        self._done = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        self._done.add_done_callback(lambda _: self._notify())

    def put(self, rollouts: list[Rollout]) -> None:
        """Queue a micro-batch for scoring; blocks while the teacher is too far behind
        (backpressure, counted in stats.put_wait_s)."""
        started = time.perf_counter()
        self._put(list(rollouts))
        self.stats.put_wait_s += time.perf_counter() - started

    def scored_frames(self) -> Iterator[tuple[list[Rollout], dict[int, SequenceScore]]]:
        """Call after the last put. Yields each micro-batch with its rollouts' scores, in the order
        they were put, as soon as the whole micro-batch is scored: the caller can train on it while
        the teacher scores the rest. Time spent blocked counts in stats.wait_s."""
        started = time.perf_counter()
        self._close_input()  # may wait for room in the inbox
        self.stats.wait_s += time.perf_counter() - started
        index = 0
        while True:
            started = time.perf_counter()
            with self._changed:
                self._changed.wait_for(lambda i=index: self._frame_ready(i) or self._done.done())
                ready = self._frame_ready(index)
            self.stats.wait_s += time.perf_counter() - started
            if not ready:  # the feed is done: every frame has been put
                self._done.result()  # if it failed, raise its error here
                if index < len(self.frames):
                    raise RuntimeError(f"micro-batch {index} ended the step unscored")
                return
            frame = self.frames[index]
            yield frame, {r.key: self.scores[r.key] for r in frame}
            index += 1

    def abandon(self, reason: str) -> None:
        """From any thread: end the step's scoring now, its streams cancelled, and fail the step's
        next call here with StepAbandoned(reason) (a server shutting down gives up on a step that
        waits on a hung teacher, rather than be killed with it and lose the steps before it)."""
        self._loop.call_soon_threadsafe(self._refuse, StepAbandoned(reason))

    def finish(self) -> tuple[dict[int, SequenceScore], FeedStats]:
        """Wait for every queued rollout's score; returns {rollout.key: score} and stats."""
        self._close_input()
        self._done.result()
        return self.scores, self.stats

    def _close_input(self) -> None:
        if not self._closing:
            self._closing = True
            self._put(None)

    def _put(self, item: list[Rollout] | None) -> None:
        """Put on the inbox, waiting for room; if the feed fails meanwhile, raise its error."""

        async def queued_unless_ended() -> bool:
            put = asyncio.ensure_future(self._inbox.put(item))
            ended = asyncio.ensure_future(self._ended.wait())
            await asyncio.wait({put, ended}, return_when=asyncio.FIRST_COMPLETED)
            queued = put.done() and not self._ended.is_set()  # a dead inbox is no queue
            put.cancel()
            ended.cancel()
            return queued

        if not asyncio.run_coroutine_threadsafe(queued_unless_ended(), self._loop).result():
            self._done.result()  # _run is ending: wait for it, and raise its error

    def _frame_ready(self, index: int) -> bool:
        return index < len(self.frames) and not self._missing[index]

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _request(self, rollouts: list[Rollout]) -> ScoreRequest:
        return ScoreRequest(
            sequences=[
                {"prompt_ids": r.prompt_ids, "completion_ids": r.completion_ids} for r in rollouts
            ],
            top_k=self.top_k,
            max_positions=self.max_positions,
        )

    async def _run(self) -> None:
        self._watcher = asyncio.create_task(self._rescue_stalled_frames())
        try:
            await self._feed_lanes()
        except BaseException:
            # Failing early (a refused frame, a stall): stop the streams and collect their
            # outcomes, so none is left running or logged as never retrieved (the watcher
            # first: it starts rescues).
            await _cancelled([self._watcher])
            await _cancelled(self._streams + self._rescues)
            raise
        finally:
            self._watcher.cancel()
            self._ended.set()

    async def _feed_lanes(self) -> None:
        lanes = self._lanes
        # Room first, then the next frame: so put() blocks once frames_in_flight times the
        # lanes await scores in all, and as many again wait in the inbox.
        while True:
            await self._room_for_a_frame()
            batch = await self._inbox.get()
            if batch is None:
                break
            if self._refused is not None:  # refused while this frame waited in the inbox
                raise self._refused
            frame = len(self.frames)
            self._missing[frame] = len(batch)
            with self._changed:
                self.frames.append(batch)
            self._rollouts += len(batch)
            lane = self._pick_lane(lanes, frame)
            lane.sent.append(frame)
            lane.open[frame] = len(batch)
            self._sent_at[frame] = asyncio.get_running_loop().time()
            await lane.queue.put(frame)
        for lane in lanes.values():
            await lane.queue.put(None)
        streams = list(self._streams)  # lanes given up on too: one may still hang
        await self._ended_or_all_scored(lambda: streams)
        await _cancelled([self._watcher])  # the streams are over: no frame can stall now
        await self._ended_or_all_scored(lambda: self._rescues)
        for frame in self._timed_out:
            if self._missing[frame] and len(self._lane_keys) == 1:
                # Its one replica took it and did not answer: asking it again would only wait
                # as long again. (Behind a balancer, or with other URLs, another may answer.)
                raise self._timed_out[frame]
        # What a rescue could not score (every replica down then, or a hung one handed it):
        # once more, now that the client retries with its full backoff; a refusal (a stop that
        # gives up on the step) ends the wait for it.
        for frame in range(len(self.frames)):
            rescore = asyncio.create_task(self._rescore(frame))
            self._rescues.append(rescore)  # cancelled with the rest should the step fail
            await self._ended_or_all_scored(lambda r=rescore: [r])

    async def _ended_or_all_scored(self, tasks: Callable[[], list[asyncio.Task]]) -> None:
        """Wait for `tasks` to end (raising the first error one ended with: a refused frame, by
        name), or until every rollout is scored: then a task still running (a hung replica's
        stream, a rescue whose frame its first replica answered after all) is not waited for."""
        while True:
            if self._refused is not None:
                raise self._refused
            for task in tasks():
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            running = [t for t in tasks() if not t.done()]
            if self._all_scored() or not running:
                break
            self._answered.clear()
            answered = asyncio.ensure_future(self._answered.wait())
            await asyncio.wait([*running, answered], return_when=asyncio.FIRST_COMPLETED)
            answered.cancel()
        await _cancelled(tasks())

    def _all_scored(self) -> bool:
        # Counted, not looked up: it is asked after each score at the step's end.
        return len(self.scores) == self._rollouts

    async def _rescue_stalled_frames(self) -> None:
        """Every little while: give up on a lane with stalled frames (see stalled_frames) and
        score its frames elsewhere. (A lane that keeps answering is alive, its frames only
        queued: with several lanes to one replica, behind its siblings' frames.)"""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, HEDGE_AFTER_S / 4))
            lanes = list(self._lanes.values())
            for lane in lanes:
                if lane.failed:
                    continue
                others = max((o.answered_at for o in lanes if o is not lane), default=-1.0)
                if stalled := stalled_frames(lane, others, self._sent_at, loop.time()):
                    log.warning(
                        "teacher %s has not answered frames %s for %.0f s; scoring them elsewhere",
                        lane.url,
                        stalled,
                        HEDGE_AFTER_S,
                    )
                    self._give_up_on(lane)

    def _give_up_on(self, lane: _Lane) -> None:
        """No more frames for `lane` (its key gets a new stream), and its unanswered ones are
        scored elsewhere now; its URL sits out (see _sit_out)."""
        lane.failed = True
        self._answered.set()  # its frames no longer count as in flight
        lane.queue.put_nowait(None)  # end its request body, should it be waiting for frames
        self._sit_out(lane.url)
        # Once per frame: a lane is given up on once, and a frame is only ever sent on one lane.
        for frame in sorted(lane.open):
            self._rescues.append(asyncio.create_task(self._rescue(frame)))

    def _refuse(self, exc: Exception) -> None:
        """Fail the step with `exc` as soon as the feeding loop looks (see _room_for_a_frame)."""
        self._refused = exc
        self._answered.set()

    def _sit_out(self, url: str) -> None:
        """Give `url` no new frames for a while, if a lane is its one stream: behind a balancer,
        one lane's replica is not the whole pool."""
        if self._feed.streams_per_url == 1:
            self._feed.client.mark_down(url)

    async def _room_for_a_frame(self) -> None:
        """Wait until a frame may go out; a refused frame ends the step here, by name."""
        timeout = self._feed.client.timeout
        while True:
            if self._refused is not None:
                raise self._refused
            if (waiting := self._frames_in_flight()) < self._max_in_flight:
                return
            self._answered.clear()
            try:
                await asyncio.wait_for(self._answered.wait(), timeout)
            except asyncio.TimeoutError:
                # Rather than wait forever: a proxy that holds a request body until it ends
                # would send no score back while the trainer holds back the rest of the body.
                raise TeacherTimedOut(
                    f"no score came back in {timeout:g} s while {waiting} frames awaited theirs "
                    "(a proxy in front of /score/stream must stream request bodies, not buffer "
                    "them)"
                ) from None

    def _frames_in_flight(self) -> int:
        """Frames sent to a live lane and not yet wholly scored (a failed lane's frames wait for
        the rescoring pass at the end of the step, so they do not hold up the stream)."""
        return sum(len(lane.open) for lane in self._lanes.values() if not lane.failed)

    def _pick_lane(self, lanes: dict[tuple[str, int], _Lane], frame: int) -> _Lane:
        client = self._feed.client
        keys = [
            k
            for k in self._lane_keys
            if client.is_up(k[0]) and not (k in lanes and lanes[k].failed)
        ]
        if not keys:  # every replica is down: the rescoring pass retries with backoff
            keys = list(self._lane_keys)
        # Fewest sequences awaiting scores first; a lane with no stream yet counts as idle. Ties go
        # round (from frame to frame), so one replica does not always get each step's first.
        start = frame % len(keys)
        key = min(keys[start:] + keys[:start], key=lambda k: lanes[k].awaiting if k in lanes else 0)
        if key not in lanes or lanes[key].failed:
            lanes[key] = _Lane(key[0])
            lanes[key].task = asyncio.create_task(self._stream(lanes[key]))
            self._streams.append(lanes[key].task)
        return lanes[key]

    async def _stream(self, lane: _Lane) -> None:
        async def requests():
            while (frame := await lane.queue.get()) is not None:
                yield self._request(self.frames[frame])

        try:
            # Closed at once when an answer fails the lane here, not when it is collected.
            stream = contextlib.aclosing(self._feed.client.score_stream(requests(), url=lane.url))
            async with stream as items:
                async for item in items:
                    if not item.done:  # the done frame: the client checks its count
                        self._on_answer(lane, item)
        except (TeacherStreamError, FingerprintMismatch) as exc:  # fails the step, by name
            lane.failed = True
            self._refuse(exc)
            raise
        except Exception as exc:  # the replica died, broke the connection or failed
            if not lane.failed:  # not given up on already, as stalled
                log.warning(
                    "teacher %s failed mid-step (%s); rescoring its rollouts", lane.url, exc
                )
                self._give_up_on(lane)

    def _on_answer(self, lane: _Lane, item) -> None:
        """A score or an error on `lane`'s stream (the client has held it to the frames and
        sequences the stream sent, in the shape asked for)."""
        frame = lane.sent[item.frame]
        if item.error is None:
            lane.answered_at = asyncio.get_running_loop().time()
            lane.answered(frame)
            self._take(frame, self.frames[frame][item.index], item.score, item.compute_s)
            return
        if lane.failed:  # given up on: its frames are another lane's now
            log.info("teacher %s answered frame %d late: %s", lane.url, frame, item.error)
            return
        if not _replica_fault(item.error):
            raise TeacherStreamError(f"teacher at {lane.url} refused frame {frame}: {item.error}")
        if item.index is None:
            raise ServerError(f"teacher at {lane.url}, frame {frame}: {item.error.get('message')}")
        # One sequence failed; its siblings still come on this stream. The lane is done with it:
        # should its rescue fail too, that waits for the step's end, not holding up the stream.
        lane.answered(frame)
        self._answered.set()  # the frame may be off the lane now: room for another
        self._rescue_one(lane, frame, self.frames[frame][item.index], item.error)

    def _rescue_one(self, lane: _Lane, frame: int, rollout: Rollout, error: dict) -> None:
        """Score elsewhere, now, a rollout whose scoring failed on `lane`'s replica; the lane goes
        on with the rest of its frames, and its URL gets no new ones for a while (its forwards may
        all be failing) if it is the URL's one stream."""
        log.warning(
            "teacher %s could not score a rollout of frame %d (%s); scoring it elsewhere",
            lane.url,
            frame,
            error.get("message"),
        )
        self._sit_out(lane.url)
        self._rescues.append(asyncio.create_task(self._rescue(frame, [rollout])))

    def _take(self, frame: int, rollout: Rollout, score: SequenceScore, compute_s: float) -> None:
        self.stats.compute_s += compute_s
        self.stats.scored_tokens += len(score.logprobs)
        if rollout.key in self.scores:
            return  # already answered (a rescored duplicate): the first score trains
        with self._changed:  # the count and the score together: scored_frames() reads both
            self.scores[rollout.key] = score
            self._missing[frame] -= 1
            self._changed.notify_all()
        self._answered.set()

    async def _rescue(self, frame: int, only: list[Rollout] | None = None) -> None:
        """Score again a failed lane's frame (or `only` those of its rollouts), now, so the step
        need not wait for its end; what fails here is tried again after the last frame, except a
        request that a replica took and did not answer in time: that fails the step, if the frame
        is not answered meanwhile."""
        try:
            await self._rescore(frame, only)
        except FingerprintMismatch as exc:
            self._refuse(exc)
            raise
        except TeacherTimedOut as exc:
            self._timed_out[frame] = exc
            log.warning("rescoring frame %d got no answer in time (%s)", frame, exc)
        except TeacherError as exc:
            log.warning(
                "rescoring frame %d failed (%s); trying again at the step's end", frame, exc
            )

    async def _rescore(self, frame: int, only: list[Rollout] | None = None) -> None:
        """Score `frame`'s rollouts (or `only` those) that have no score yet, in one request (a
        frame's size: a whole step's in one could outlast the timeout or the teacher's body
        limit)."""
        missing = [r for r in (only or self.frames[frame]) if r.key not in self.scores]
        if not missing:
            return
        # The unary call retries with backoff and fails over between replicas on its own.
        result = await self._feed.client.score(
            [(r.prompt_ids, r.completion_ids) for r in missing],
            top_k=self.top_k,
            max_positions=self.max_positions,
        )
        # Each was scored again, whether or not its first answer came back meanwhile (then the
        # first trains and this one is only paid for).
        self.stats.rescored += len(missing)
        for rollout, score in zip(missing, result.results):
            self._take(frame, rollout, score, 0.0)


async def _cancelled(tasks: list[asyncio.Task]) -> None:
    """Cancel `tasks` and wait for them to end, their outcomes collected (none logged as never
    retrieved)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class TeacherFeed:
    """Owns an asyncio loop in a background thread and the async client that talks to the teacher."""

    def __init__(
        self,
        urls: list[str],
        api_key: str | None = None,
        frames_in_flight: int = 4,
        timeout: float = 120.0,
        streams_per_url: int = 1,
    ):
        self.frames_in_flight = frames_in_flight
        self.streams_per_url = streams_per_url
        self._runner = LoopThread("teacher-feed")
        self.loop = self._runner.loop
        self.call = self._runner.call  # run a coroutine on the feed's loop, from any other thread
        self.client = self.call(self._make_client(urls, api_key, timeout))

    async def _make_client(self, urls, api_key, timeout) -> AsyncTeacherClient:
        return AsyncTeacherClient(urls, api_key=api_key, timeout=timeout)

    def begin(self, max_positions: int | None, top_k: int = 0) -> StepFeed:
        return StepFeed(self, max_positions, top_k)

    def close(self) -> None:
        # A step that failed mid-stream leaves its tasks waiting: they end before the client does.
        self.call(cancel_pending())
        self.call(self.client.aclose())
        self._runner.close()
