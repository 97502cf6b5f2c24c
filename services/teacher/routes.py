"""HTTP routes of the teacher: /score (JSON or msgpack), /health, /ready, /info, /metrics."""

from __future__ import annotations

import asyncio
import socket

from fastapi import APIRouter, Request, Response

from services.teacher.deps import (
    Authorized,
    Ready,
    get_state,
    is_binary_request,
    read_body,
    wants_binary_response,
    while_connected,
)
from services.teacher.scoring import check_answer_size, score_request
from shared.protocol import (
    JSON,
    MSGPACK,
    ScoreRequest,
    ScoreResponse,
    decode_request,
    encode_response,
)
from shared.web import VERSION, metrics_response

router = APIRouter()


def inlined(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` written in place of their references: inside an
    OpenAPI document, "#/$defs/..." would be looked up at the document's root, where none are."""
    defs = schema.get("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


# The body is read by hand (two content types), so its schema is given to the docs here.
_SCORE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {"schema": inlined(ScoreRequest.model_json_schema())},
            MSGPACK: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/score",
    response_model=ScoreResponse,
    openapi_extra=_SCORE_BODY,
    responses={200: {"content": {MSGPACK: {}}}},
    summary="Teacher log-probs of completion tokens (JSON or msgpack)",
)
async def score(request: Request, _: Authorized, state: Ready) -> Response:
    binary = is_binary_request(request)
    body = await read_body(request, state.settings.max_body_bytes)
    # Decoded and encoded in worker threads: a large body takes seconds as Python objects, and
    # on the event loop it would hold up every other request (health checks, streams) meanwhile.
    parsed = await asyncio.to_thread(decode_request, body, binary)
    check_answer_size(parsed)
    scoring = score_request(parsed, state.backend, state.limits, state.metrics)
    result = await while_connected(request, scoring)
    out_binary = wants_binary_response(request, binary)
    encoded = await asyncio.to_thread(encode_response, result, out_binary)
    return Response(encoded, media_type=MSGPACK if out_binary else JSON)


@router.get("/health", summary="Alive (the process answers)")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="200 once the model is loaded, 503 while it loads, 500 if it failed")
async def ready(state: Ready) -> dict:
    return {"status": "ready"}


@router.get("/info", summary="Model, backend, limits and tokenizer fingerprint")
async def info(_: Authorized, state: Ready) -> dict:
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
        "version": VERSION,  # of the server's package, for a client that must know
        # Which replica answered: behind a load balancer, tells replicas apart.
        "instance": socket.gethostname(),
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    state.metrics.queue_depth.set(state.backend.queue_depth())
    return metrics_response(state.metrics.registry)
