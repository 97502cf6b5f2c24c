"""HTTP routes of the teacher: /score (JSON or msgpack), /health, /ready, /info, /metrics."""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from services.teacher.scoring import score_as_completed, score_request
from shared.errors import (
    BadRequest,
    InvalidRequest,
    MalformedBody,
    NotReady,
    PayloadTooLarge,
    ServerError,
    TeacherError,
    Unauthorized,
    UnsupportedMediaType,
    from_validation,
)
from shared.protocol import (
    FRAMES,
    JSON,
    MSGPACK,
    MSGPACK_TYPES,
    FrameReader,
    ScoreRequest,
    ScoreResponse,
    an_object,
    decode_request,
    encode_response,
    encode_stream_done,
    encode_stream_error,
    encode_stream_score,
    load_json,
)
from shared.web import metrics_response

M = TypeVar("M", bound=BaseModel)

router = APIRouter()


def get_state(request: Request):
    return request.app.state.teacher


def ready_state(request: Request):
    """The state, once the model is loaded; 503 while it loads, 500 if it failed to."""
    state = get_state(request)
    if state.load_error:  # permanent: a 500, which clients do not retry (a 503 they would)
        raise ServerError(f"model failed to load: {state.load_error}")
    if state.limits is None:
        raise NotReady("model loading", retry_after=2)
    return state


def check_api_key(request: Request) -> None:
    key = get_state(request).settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode(), key.get_secret_value().encode()
    ):
        raise Unauthorized(
            "missing or wrong API key (send 'Authorization: Bearer KEY')", param="Authorization"
        )


Ready = Annotated[object, Depends(ready_state)]
Authorized = Annotated[None, Depends(check_api_key)]

# The body is read by hand (two content types), so its schema is given to the docs here.
_SCORE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {"schema": ScoreRequest.model_json_schema()},
            MSGPACK: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def is_binary_request(request: Request) -> bool:
    ctype = request.headers.get("content-type", JSON).split(";")[0].strip().lower()
    if ctype in MSGPACK_TYPES:
        return True
    if ctype in (JSON, ""):
        return False
    raise UnsupportedMediaType(
        f"Content-Type {ctype!r} is not supported; send {JSON} or {MSGPACK}", param="Content-Type"
    )


def wants_binary_response(request: Request, binary_request: bool) -> bool:
    """msgpack when Accept names it; with no Accept, answer in the request's own form."""
    accept = request.headers.get("accept", "").lower()
    if any(t in accept for t in MSGPACK_TYPES):
        return True
    return binary_request and accept in ("", "*/*")


async def read_body(request: Request, limit_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_model(request: Request, model: type[M], limit_bytes: int) -> M:
    """A dialect route's JSON body as `model`; what is wrong with it is a 400 naming the field, as
    those dialects' own servers answer."""
    try:
        data = an_object(load_json(await read_body(request, limit_bytes)), "JSON object")
    except MalformedBody as exc:
        raise BadRequest(exc.message) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc.errors(include_url=False), BadRequest) from None


def in_dialect(exc: InvalidRequest, top_k_name: str) -> BadRequest:
    """A refusal from the scoring path in a dialect's words: a 400, and its own name for top_k."""

    def words(text: str | None) -> str | None:
        return None if text is None else re.sub(r"\btop_k\b", top_k_name, text)

    return BadRequest(words(exc.message), param=words(exc.param))


@router.post(
    "/score",
    response_model=ScoreResponse,
    openapi_extra=_SCORE_BODY,
    responses={200: {"content": {MSGPACK: {}}}},
    summary="Teacher log-probs of completion tokens (JSON or msgpack)",
)
async def score(request: Request, state: Ready, _: Authorized) -> Response:
    binary = is_binary_request(request)
    body = await read_body(request, state.settings.max_body_bytes)
    parsed = decode_request(body, binary)
    result = await score_request(parsed, state.backend, state.limits, state.metrics)
    out_binary = wants_binary_response(request, binary)
    return Response(encode_response(result, out_binary), media_type=MSGPACK if out_binary else JSON)


@router.post(
    "/score/stream",
    openapi_extra={"requestBody": {"required": True, "content": {FRAMES: {}}}},
    responses={200: {"content": {FRAMES: {}}}},
    summary="Stream micro-batches in, one result frame per sequence out (see shared.protocol)",
)
async def score_stream(request: Request, state: Ready, _: Authorized) -> StreamingResponse:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != FRAMES:
        raise UnsupportedMediaType(
            f"/score/stream takes {FRAMES}, not {ctype!r}", param="Content-Type"
        )
    out: asyncio.Queue = asyncio.Queue()
    reader = asyncio.create_task(_read_frames(request, state, out))

    async def frames():
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            reader.cancel()  # the client went away: stop reading and scoring

    return DuplexStreamingResponse(frames(), media_type=FRAMES)


class DuplexStreamingResponse(StreamingResponse):
    """A streaming response that leaves the request body to the handler.

    Starlette's StreamingResponse also listens for a disconnect by calling receive(), which would
    swallow the request frames still arriving; here the handler reads them, and notices a client
    that goes away (see _read_frames).
    """

    async def __call__(self, scope, receive, send) -> None:
        await self.stream_response(send)


async def _read_frames(request: Request, state, out: asyncio.Queue) -> None:
    """Score each frame as soon as it arrives; put result frames on `out`, then None. Broken
    framing ends the input, saying why, after the frames before it are answered. A client that
    goes away, mid-body or after it, cancels the scoring of what it sent (nobody would read it)."""
    reader = FrameReader(state.settings.max_body_bytes)
    tasks: list[asyncio.Task] = []
    broken: TeacherError | None = None
    try:
        try:
            async for chunk in request.stream():
                for payload in reader.feed(chunk):
                    tasks.append(asyncio.create_task(_score_frame(len(tasks), payload, state, out)))
            reader.finish()
        except TeacherError as err:
            broken = err
        except ClientDisconnect:
            return
        scoring = asyncio.gather(*tasks)
        gone = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({scoring, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this reader is cancelled
            gone.cancel()
            if not scoring.done():
                scoring.cancel()
        if scoring.cancelled():
            return
        counts = scoring.result()
        if broken is not None:
            await out.put(encode_stream_error(len(tasks), broken))
        await out.put(encode_stream_done(len(tasks), sum(counts)))
    finally:
        for task in tasks:
            task.cancel()
        await out.put(None)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone. Only called after the body has been read (or its framing
    broke, when the rest is skipped): uvicorn drops what is sent to a client that has gone, so the
    responses being sent would never tell."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _score_frame(frame: int, payload: bytes, state, out: asyncio.Queue) -> int:
    try:
        request = decode_request(payload, binary=True)
        async for index, job, score in score_as_completed(
            request, state.backend, state.limits, state.metrics
        ):
            await out.put(encode_stream_score(frame, index, score, job.compute_s))
        return len(request.sequences)
    except TeacherError as err:  # refused, or its forward failed (a 500): the others go on
        await out.put(encode_stream_error(frame, err))
        return 0


@router.get("/health", summary="Alive (the process answers)")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="200 once the model is loaded, 503 while it loads, 500 if it failed")
async def ready(state: Ready) -> dict:
    return {"status": "ready"}


@router.get("/info", summary="Model, backend, limits and tokenizer fingerprint")
async def info(state: Ready, _: Authorized) -> dict:
    i = state.backend.info
    return {
        "model": i.model,
        "backend": i.backend,
        "dtype": i.dtype,
        "device": i.device,
        "vocab_size": i.vocab_size,
        "max_seq_len": i.max_seq_len,
        "max_top_k": state.limits.max_top_k,
        "max_batch_tokens": state.settings.max_batch_tokens,
        "tokenizer_fingerprint": i.tokenizer_fingerprint,
        # Which replica answered: behind a load balancer, tells replicas apart.
        "instance": socket.gethostname(),
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    state.metrics.queue_depth.set(state.backend.queue_depth())
    return metrics_response(state.metrics.registry)
