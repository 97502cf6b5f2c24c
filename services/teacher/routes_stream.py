"""POST /score/stream: length-prefixed msgpack frames in (one micro-batch each), one result frame
per scored sequence out as soon as it is scored, while the request body is still arriving. A frame
waits for room in a full queue, and the body is read at most one chunk ahead meanwhile (to notice a
client that goes away): TCP holds the client back. So
does a client that leaves its results unread: the teacher reads no more frames until it catches up,
and refuses them (small error frames) once it has waited UNREAD_WAIT_S, so that a client that sends
all its frames before it reads any result gets errors instead of a stream that never ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from services.teacher.deps import Authorized, Ready, client_gone
from services.teacher.scoring import (
    check_answer_size,
    failures_as_server_errors,
    score_as_completed,
)
from shared.errors import QueueFull, TeacherError, UnsupportedMediaType
from shared.protocol import (
    FINGERPRINT_HEADER,
    FRAMES,
    FrameReader,
    decode_request,
    encode_stream_done,
    encode_stream_error,
    encode_stream_score,
)
from shared.web import media_type

router = APIRouter()
T = TypeVar("T")
# Result bytes a stream may leave unread before the teacher stops reading its frames: results are
# up to 40 times the size of the frames they answer, so a client that sends without reading (not a
# full-duplex one) would otherwise grow the teacher's memory without end.
MAX_UNREAD_BYTES = 64 * 2**20
UNREAD_WAIT_S = 60.0


class Outbox:
    """A stream's result frames not sent yet, and whether they leave room for more: up to
    `max_bytes` of results, and twice that with the refusals sent once the client has not read
    for UNREAD_WAIT_S (each small, but a frame of a few bytes gets one: a client sending tiny
    frames without reading would grow them without end)."""

    def __init__(self, max_bytes: int):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._max_bytes = max_bytes
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._room_for_refusals = asyncio.Event()
        self._room_for_refusals.set()

    async def put(self, item: bytes | None) -> None:  # None: the end
        self._queue.put_nowait(item)
        self._bytes += len(item or b"")
        self._mark_room()

    async def get(self) -> bytes | None:
        item = await self._queue.get()
        self._bytes -= len(item or b"")
        self._mark_room()
        return item

    def _mark_room(self) -> None:
        for event, limit in (
            (self._room, self._max_bytes),
            (self._room_for_refusals, 2 * self._max_bytes),
        ):
            if self._bytes <= limit:
                event.set()
            else:
                event.clear()

    async def room_for_refusals(self) -> None:
        """Once the client has read enough of them (however long that takes: TCP holds it)."""
        await self._room_for_refusals.wait()

    def has_room(self) -> bool:
        return self._room.is_set()

    async def room(self, timeout: float) -> bool:
        """Whether the client has read enough to make room, waiting up to `timeout` seconds."""
        try:
            await asyncio.wait_for(self._room.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


@router.post(
    "/score/stream",
    openapi_extra={"requestBody": {"required": True, "content": {FRAMES: {}}}},
    responses={200: {"content": {FRAMES: {}}}},
    summary="Stream micro-batches in, one result frame per sequence out (see shared.protocol)",
)
async def score_stream(request: Request, _: Authorized, state: Ready) -> StreamingResponse:
    ctype = media_type(request)
    if ctype != FRAMES:
        raise UnsupportedMediaType(
            f"/score/stream takes {FRAMES}, not {ctype!r}", param="Content-Type"
        )
    out = Outbox(MAX_UNREAD_BYTES)
    reader = asyncio.create_task(_read_frames(request, state, out))

    async def frames():
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            reader.cancel()  # the client went away: stop reading and scoring

    fingerprint = state.backend.info.tokenizer_fingerprint
    return DuplexStreamingResponse(
        frames(), media_type=FRAMES, headers={FINGERPRINT_HEADER: fingerprint}
    )


class DuplexStreamingResponse(StreamingResponse):
    """A streaming response that leaves the request body to the handler.

    Starlette's StreamingResponse also listens for a disconnect by calling receive(), which would
    swallow the request frames still arriving; here the handler reads them, and notices a client
    that goes away (see _read_frames).
    """

    async def __call__(self, scope, receive, send) -> None:
        await self.stream_response(send)


class _Body:
    """The request body's chunks, with the next one asked for while the reader waits on something
    else (room in the queue, the client reading its results), so that a client that goes away is
    noticed then, not after the teacher has queued and scored every frame it had sent. One chunk
    ahead at most: TCP still holds the client back."""

    def __init__(self, request: Request):
        self._chunks = aiter(request.stream())
        self._ahead: asyncio.Future | None = None

    def _next(self) -> asyncio.Future:
        if self._ahead is None:
            self._ahead = asyncio.ensure_future(anext(self._chunks, None))
        return self._ahead

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        ahead, self._ahead = self._next(), None
        if (chunk := await ahead) is None:
            raise StopAsyncIteration
        return chunk

    async def until(self, waiting: Awaitable[T]) -> T:
        """`waiting`'s result; ClientDisconnect as soon as the client goes away meanwhile."""
        task = asyncio.ensure_future(waiting)
        try:
            ahead = self._next()
            await asyncio.wait({task, ahead}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and ahead.exception() is not None:
                raise ahead.exception()
            return await task  # a chunk came: it waits its turn
        finally:
            task.cancel()

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel()
            # Retrieved, so a disconnect nobody waited for is not logged as never retrieved.
            self._ahead.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _read_frames(request: Request, state, out: Outbox) -> None:
    """Score each frame as soon as it arrives; put result frames on `out`, then None. Broken
    framing ends the input, saying why, after the frames before it are answered. A client that
    goes away, mid-body or after it, cancels the scoring of what it sent (nobody would read it)."""
    reader = FrameReader(state.settings.max_body_bytes, skip_oversize=True)
    # The frames being scored, each dropped when done (a long-lived stream would otherwise keep
    # a task for every frame it ever sent), and the sequences the done ones scored.
    tasks: set[asyncio.Task] = set()
    frames = scored = 0
    died: list[BaseException] = []  # a frame's failure of ours that answered nothing: ends it

    def frame_done(task: asyncio.Task) -> None:
        nonlocal scored
        tasks.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            died.append(task.exception())
        else:
            scored += task.result()

    broken: TeacherError | None = None
    given_up = False  # on the client reading its results, till it does
    body = _Body(request)
    try:
        try:
            async for chunk in body:
                for payload in reader.feed(chunk):
                    # Results unread: take no more until the client catches up, or refuse them
                    # once it has not for UNREAD_WAIT_S (it may be reading only after sending).
                    if out.has_room():
                        given_up = False
                    elif not given_up:
                        given_up = not await body.until(out.room(UNREAD_WAIT_S))
                    if given_up:
                        await body.until(out.room_for_refusals())
                        payload = QueueFull(
                            f"over {MAX_UNREAD_BYTES / 2**20:g} MiB of this stream's results were "
                            f"unread for {UNREAD_WAIT_S:g} s: read results while sending frames"
                        )
                    queued = asyncio.Event()
                    task = asyncio.create_task(_score_frame(frames, payload, state, out, queued))
                    frames += 1
                    tasks.add(task)
                    task.add_done_callback(frame_done)
                    # Backpressure: the next frame is read once this one is queued or refused, so
                    # a full queue holds the client back instead of refusing its frames.
                    await body.until(queued.wait())
            reader.finish()
        except TeacherError as err:
            broken = err
        except ClientDisconnect:
            return
        scoring = asyncio.gather(*tasks)
        gone = asyncio.create_task(client_gone(request))
        all_scored = False
        try:
            await asyncio.wait({scoring, gone}, return_when=asyncio.FIRST_COMPLETED)
            all_scored = scoring.done()
        finally:  # also when this reader is cancelled
            gone.cancel()
            if not all_scored:
                scoring.cancel()
                # Collect the cancelled gather's outcome, so it is not logged as never retrieved.
                scoring.add_done_callback(lambda done: done.cancelled() or done.exception())
        if not all_scored:  # the client has gone
            return
        # Each frame has been counted: its frame_done ran before gather's callback (added first).
        scoring.result()  # retrieved, so a failure is not also logged as never retrieved
        if died:  # the stream breaks off, done frame unsent, as the client then knows
            raise died[0]
        if broken is not None:
            await out.put(encode_stream_error(frames, broken))
        await out.put(encode_stream_done(frames, scored))
    finally:
        body.close()
        for task in list(tasks):
            task.cancel()
        await out.put(None)


async def _score_frame(
    frame: int, payload: bytes | TeacherError, state, out: Outbox, queued: asyncio.Event
) -> int:
    scored = 0
    try:
        # A failure of ours here (a bug, not a forward's) still answers the frame, so the stream
        # reaches its done frame instead of stopping without one.
        with failures_as_server_errors(f"stream frame {frame}"):
            if isinstance(payload, TeacherError):  # a frame too large to read, read past
                raise payload
            # In a worker thread, as /score's: a large frame takes seconds as Python objects.
            request = await asyncio.to_thread(decode_request, payload, True)
            check_answer_size(request)
            async for index, job, outcome in score_as_completed(
                request, state.backend, state.limits, state.metrics, queued
            ):
                if isinstance(outcome, TeacherError):  # this sequence's forward failed (a 500)
                    await out.put(encode_stream_error(frame, outcome, index))
                else:
                    await out.put(encode_stream_score(frame, index, outcome, job.compute_s))
                    scored += 1
        return scored
    except TeacherError as err:  # the frame was refused: the other frames go on
        await out.put(encode_stream_error(frame, err))
        return 0
    finally:
        queued.set()
