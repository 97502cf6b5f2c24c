"""TRL's dialect: the routes `trl vllm-serve` offers and `trl`'s `VLLMClient` calls for distillation.

    POST /get_sequence_logprobs/   {"sequences": [[int]], "prompt_lengths": [int], "top_logprobs": 100,
                                    "temperature": 1.0, "response_format": "json" | "binary"}
    GET  /health/                  {"status": "ok"}
    GET  /get_world_size/          {"world_size": 1}

Scoring goes through the same path as POST /score (`score_request`). Differences from TRL's server:
temperature really divides the logits (stock vLLM ignores it for prompt log-probs); top_logprobs above
the server's --max-top-k, a prompt of length 0, and any field TRL does not define are refused with a
400 in the OpenAI error shape, instead of TRL's 500. Weight sync (init_communicator, ...) is absent:
a teacher is frozen.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from services.teacher.deps import (
    Authorized,
    Ready,
    in_dialect,
    json_built_off_the_loop,
    read_model,
    while_connected,
)
from services.teacher.scoring import (
    check_response_entries,
    check_tokens,
    check_top_k,
    score_request,
)
from shared.errors import BadRequest, InvalidRequest
from shared.protocol import (
    ScoreRequest,
    SequenceScore,
    Temperature,
    TokenIds,
    count,
    json_logprobs,
    list_of,
)

router = APIRouter(tags=["TRL"])


class SequenceLogprobsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sequences: list_of(TokenIds) = Field(min_length=1)
    prompt_lengths: list_of(count(ge=0))
    top_logprobs: count(ge=0) = 100
    temperature: Temperature = 1.0
    response_format: Literal["json", "binary"] = "json"


@router.post("/get_sequence_logprobs/", summary="TRL: teacher log-probs of completion tokens")
@router.post("/get_sequence_logprobs", include_in_schema=False)
async def get_sequence_logprobs(request: Request, _: Authorized, state: Ready) -> Response:
    body = await read_model(request, SequenceLogprobsRequest, state.settings.max_body_bytes)
    if len(body.prompt_lengths) != len(body.sequences):
        raise BadRequest(
            f"{len(body.sequences)} sequences but {len(body.prompt_lengths)} prompt_lengths",
            param="prompt_lengths",
        )
    for i, (seq, n) in enumerate(zip(body.sequences, body.prompt_lengths)):
        if not 1 <= n <= len(seq):
            raise BadRequest(
                f"prompt_lengths.{i} is {n}; it must be between 1 and the sequence length "
                f"{len(seq)} (a first token with no context has no log-prob here)",
                param=f"prompt_lengths.{i}",
            )
    completions = [seq[n:] for seq, n in zip(body.sequences, body.prompt_lengths)]
    try:  # every sequence, scored or not, as vLLM checks every prompt
        check_top_k(body.top_logprobs, state.limits)
        for i, seq in enumerate(body.sequences):
            check_tokens(seq, state.limits, f"sequences.{i}")
        check_response_entries(_entries(completions, body), "sequences")
    except InvalidRequest as exc:
        raise in_dialect(exc, "top_logprobs") from None
    scored = [
        i for i, (seq, n) in enumerate(zip(body.sequences, body.prompt_lengths)) if n < len(seq)
    ]
    scores: dict[int, SequenceScore] = {}
    if scored:
        request_ = ScoreRequest(
            sequences=[
                {
                    "prompt_ids": body.sequences[i][: body.prompt_lengths[i]],
                    "completion_ids": body.sequences[i][body.prompt_lengths[i] :],
                }
                for i in scored
            ],
            top_k=body.top_logprobs,
            temperature=body.temperature,
        )
        try:
            result = await while_connected(
                request,
                score_request(
                    request_, state.backend, state.limits, state.metrics, wait_for_room=True
                ),
            )
        except InvalidRequest as exc:
            raise in_dialect(exc, "top_logprobs") from None
        scores = dict(zip(scored, result.results))
    if body.response_format == "binary":
        return await json_built_off_the_loop(
            lambda: binary_response(scores, completions, body.top_logprobs)
        )
    return await json_built_off_the_loop(lambda: json_response(scores, completions))


def _entries(completions: list[list[int]], body: SequenceLogprobsRequest) -> int:
    """The log-probs the response will hold: the top ones and the actual token's, a position; the
    binary form pads every sequence to the longest."""
    lengths = [len(c) for c in completions]
    if body.response_format == "binary":
        return len(lengths) * max(lengths) * (body.top_logprobs + 1)
    return sum(lengths) * (body.top_logprobs + 1)


def json_response(scores: dict[int, SequenceScore], completions: list[list[int]]) -> dict:
    """Per position: the top-k ids by rank, then the actual token when it is not among them."""
    logprobs, token_ids = [], []
    for i, completion in enumerate(completions):
        rows_lp, rows_id = [], []
        score = scores.get(i)
        if completion:  # log-probs made JSON numbers once per sequence, not number by number
            own = json_logprobs(score.logprobs)
            top_ids = [] if score.topk_ids is None else score.topk_ids.tolist()
            top_lps = [] if score.topk_logprobs is None else json_logprobs(score.topk_logprobs)
        for t, actual in enumerate(completion):
            ids = top_ids[t] if top_ids else []
            lps = top_lps[t] if top_lps else []
            if actual not in ids:
                ids.append(actual)
                lps.append(own[t])
            rows_lp.append(lps)
            rows_id.append(ids)
        logprobs.append(rows_lp)
        token_ids.append(rows_id)
    return {"logprobs": logprobs, "logprob_token_ids": token_ids}


def binary_response(scores: dict[int, SequenceScore], completions: list[list[int]], k: int) -> dict:
    """TRL's binary form: base64 of little-endian float32/int32 arrays [B, max_len, k] and
    [B, max_len, 1] for the actual tokens; padding is -inf and id 0."""
    lengths = [len(c) for c in completions]
    batch, width = len(lengths), max(lengths, default=0)
    lp = np.full((batch, width, k), -np.inf, dtype="<f4")
    ids = np.zeros((batch, width, k), dtype="<i4")
    actual_lp = np.full((batch, width, 1), -np.inf, dtype="<f4")
    actual_ids = np.zeros((batch, width, 1), dtype="<i4")
    for i, score in scores.items():
        n = lengths[i]
        if k:
            lp[i, :n] = score.topk_logprobs
            ids[i, :n] = score.topk_ids
        actual_lp[i, :n, 0] = score.logprobs
        actual_ids[i, :n, 0] = completions[i]
    b64 = lambda a: base64.b64encode(a.tobytes()).decode("ascii")  # noqa: E731
    return {
        "logprobs_b64": b64(lp),
        "token_ids_b64": b64(ids),
        "actual_logprobs_b64": b64(actual_lp),
        "actual_token_ids_b64": b64(actual_ids),
        "shape": [batch, width, k],
        "completion_lengths": lengths,
    }


@router.get("/health/", summary="TRL: ready to score (503 while the model loads)")
async def trl_health(_: Ready) -> dict:
    # TRL's client polls this until it answers 200 and then posts at once: as `trl vllm-serve`,
    # whose server only listens once its engine is up, 200 means the model is loaded.
    return {"status": "ok"}


@router.get("/get_world_size/", summary="TRL: world size (always 1: one scoring engine)")
@router.get("/world_size", include_in_schema=False)
async def get_world_size() -> dict:
    return {"world_size": 1}
