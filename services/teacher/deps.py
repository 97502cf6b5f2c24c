"""What the teacher's routers share: the app state as dependencies (ready, API key) and request
helpers (content negotiation, a bounded body read, a dialect's validation errors)."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from shared.errors import (
    BadRequest,
    InvalidRequest,
    MalformedBody,
    NotReady,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    UnsupportedMediaType,
    from_validation,
)
from shared.protocol import JSON, MSGPACK, MSGPACK_TYPES, an_object, load_json
from shared.web import media_type

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


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


# How long GET /v1/models waits for a model still loading. TRL's client (trl >= 1.16) takes
# /health's 200 (alive, here) as ready and then asks /v1/models once; vLLM serves nothing at all
# until its model is loaded, so its clients never see a model list refused for loading.
MODEL_WAIT_S = 600.0
_LOAD_POLL_S = 0.25


async def loaded_state(request: Request):
    """As ready_state, but a model still loading is waited for, up to MODEL_WAIT_S."""
    state = get_state(request)
    deadline = asyncio.get_running_loop().time() + MODEL_WAIT_S
    while state.limits is None and state.load_error is None:
        if asyncio.get_running_loop().time() > deadline or await request.is_disconnected():
            break
        await asyncio.sleep(_LOAD_POLL_S)
    return ready_state(request)


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
Loaded = Annotated[object, Depends(loaded_state)]  # Ready, waiting out a model still loading
Authorized = Annotated[None, Depends(check_api_key)]


def is_binary_request(request: Request) -> bool:
    ctype = media_type(request, JSON)
    if ctype in MSGPACK_TYPES:
        return True
    if ctype in (JSON, ""):
        return False
    raise UnsupportedMediaType(
        f"Content-Type {ctype!r} is not supported; send {JSON} or {MSGPACK}", param="Content-Type"
    )


def wants_binary_response(request: Request, binary_request: bool) -> bool:
    """msgpack when Accept prefers it to JSON (by q-value, the most specific range deciding each);
    with no Accept, or no preference (*/*), answer in the request's own form."""
    ranges = accepted_ranges(request.headers.get("accept", ""))
    named = [ranges[t] for t in MSGPACK_TYPES if t in ranges]  # an alias named outranks a wildcard
    q_binary = max(named) if named else quality(ranges, MSGPACK)
    q_json = quality(ranges, JSON)
    if q_binary == q_json:  # no preference; if neither is acceptable, JSON says so readably
        return binary_request and q_binary > 0
    return q_binary > q_json


def accepted_ranges(accept: str) -> dict[str, float]:
    """{media range: q} of an Accept header; an unreadable q counts as 1 (RFC 9110's default)."""
    ranges = {}
    for part in accept.lower().split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if not media:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    pass
        ranges[media] = q
    return ranges


def quality(ranges: dict[str, float], media: str) -> float:
    """The q the most specific matching range gives `media`: 1 with no Accept, 0 if none matches."""
    if not ranges:
        return 1.0
    for key in (media, media.split("/")[0] + "/*", "*/*"):
        if key in ranges:
            return ranges[key]
    return 0.0


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
    body = await read_body(request, limit_bytes)

    def parsed() -> M:
        try:
            data = an_object(load_json(body), "JSON object")
        except MalformedBody as exc:
            raise BadRequest(exc.message) from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise from_validation(exc.errors(include_url=False), BadRequest) from None

    return await asyncio.to_thread(parsed)  # as /score's: seconds for a large body


def in_dialect(exc: InvalidRequest, top_k_name: str) -> BadRequest:
    """A refusal from the scoring path in a dialect's words: a 400, and its own name for top_k."""

    def words(text: str | None) -> str | None:
        return None if text is None else re.sub(r"\btop_k\b", top_k_name, text)

    return BadRequest(words(exc.message), param=words(exc.param))


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client goes away first (its request timed out, say): then the
    work is cancelled, so sequences not yet started leave the queue to others, and the request
    ends as a ClientDisconnect (499). Call it once the body has been read."""
    task = asyncio.ensure_future(work)
    gone = asyncio.create_task(client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and gone.exception() is None:  # the client hung up first
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnect()
        return await task  # also when watching for the client failed: the work decides
    finally:
        gone.cancel()
        task.cancel()  # when this request itself is cancelled; nothing once the task is done


async def client_gone(request: Request) -> None:
    """Return once the client has gone. Only after the body has been read (or skipped): the
    request's messages are the body's until then."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def json_built_off_the_loop(build: Callable[[], object]) -> Response:
    """The JSON response `build` makes, made and encoded in a worker thread: a dialect's response
    is Python objects, about 100 us a scored position with OpenAI's per-token dicts, and built on
    the event loop it would hold up every other request (health checks, streams) meanwhile."""

    def encoded() -> bytes:
        # As starlette's JSONResponse encodes (no NaN: the log-probs were made JSON numbers).
        return json.dumps(
            build(), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode()

    return Response(await asyncio.to_thread(encoded), media_type=JSON)
