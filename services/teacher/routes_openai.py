"""vLLM's OpenAI-style dialect, the subset that scoring uses: POST /v1/completions with token-id
prompts, `echo`, `logprobs`, `prompt_logprobs` (a vLLM extension), `max_tokens` 0 or 1 and
`return_token_ids`; GET /v1/models. TRL's VLLMClient (trl >= 1.16) scores through exactly this.

Scoring goes through the same path as POST /score. What differs from vLLM: text prompts, `n` > 1,
streaming, `max_tokens` > 1 and the other generation parameters are refused with a 400 that names
them; `max_tokens` 0 generates nothing (vLLM generates one token and drops it). As in vLLM, prompt
log-probs ignore `temperature`, and `max_tokens` 1 samples one token at it (greedy at 0).
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, field_validator

from services.teacher.deps import (
    Authorized,
    Loaded,
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
from shared.errors import BadRequest, InvalidRequest, NotFound
from shared.protocol import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    Count,
    ScoreRequest,
    SequenceScore,
    TokenIds,
    count,
    json_logprobs,
    list_of,
    number,
)

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

# Parameters an OpenAI or vLLM client may send with a value that changes nothing here (their
# defaults, and vLLM's ways of saying "off"); any other value is unsupported.
_NEUTRAL = {
    "n": (1,),
    "best_of": (None, 1),
    "stream": (None, False),
    "stream_options": (None,),
    "suffix": (None,),
    "stop": (None, []),
    "seed": (None,),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "top_p": (None, 1),
    "top_k": (None, -1, 0),
    "min_p": (None, 0),
    "repetition_penalty": (None, 1),
    "add_special_tokens": (True,),
    # vLLM's own sampling extensions, as a typed client sends them when it sends every field
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "ignore_eos": (False,),
    "include_stop_str_in_output": (False,),
    "min_tokens": (0,),
    "stop_token_ids": (None, []),
    "use_beam_search": (False,),
    "length_penalty": (1,),
    "priority": (0,),
    "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    # vLLM's request fields that only a value would put to use; a client dumping vLLM's own
    # request model sends each as null
    "response_format": (None,),
    "prompt_embeds": (None,),
    "structured_outputs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "logits_processors": (None,),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
}
# Parameters that name or label a request and change no output here, whatever their value (vLLM's
# request model fills request_id with a fresh id; cache_salt only keys its prefix cache).
_LABELS = {"user", "request_id", "cache_salt"}


def _prompt_form(prompt: Any) -> str:
    if isinstance(prompt, str):
        return "str"
    first = prompt[0] if isinstance(prompt, list) and prompt else None
    return {list: "list[list[int]]", str: "list[str]"}.get(type(first), "list[int]")


# The four forms of an OpenAI prompt, told apart by their shape: validated against each, a bad one
# would get all four forms' errors, the first of them from a form it does not have.
Prompt = Annotated[
    Annotated[TokenIds, Tag("list[int]")]
    | Annotated[list_of(TokenIds), Tag("list[list[int]]")]
    | Annotated[str, Tag("str")]
    | Annotated[list_of(str), Tag("list[str]")],
    Discriminator(_prompt_form),
]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: Prompt
    max_tokens: Count | None = 16
    echo: bool | None = False  # null is vLLM's "not set": no echo
    logprobs: count(ge=0) | None = None
    prompt_logprobs: count(ge=0) | None = None
    return_token_ids: bool | None = None
    # vLLM's: log-prob tokens as "token_id:N", for tokens whose text is not their own (a byte of
    # a character) or is shared with other ids.
    return_tokens_as_token_ids: bool | None = None
    temperature: number(ge=0, le=MAX_TEMPERATURE) | None = None

    @field_validator("temperature")
    @classmethod
    def greedy_or_safe(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value


def _is_neutral(name: str, value) -> bool:
    # Python finds true == 1, but true is no top_p 1: a bool is neutral only where a bool is.
    return any(
        value == v and isinstance(value, bool) == isinstance(v, bool) for v in _NEUTRAL[name]
    )


def check_supported(body: CompletionRequest, names: tuple[str, ...]) -> list[list[int]]:
    """The request's token-id prompts, or a 400 naming what this server does not do."""
    for name, value in (body.model_extra or {}).items():
        if name in _LABELS:
            continue
        if name not in _NEUTRAL:
            raise BadRequest(f"parameter {name!r} is not supported by this teacher", param=name)
        if not _is_neutral(name, value):
            only = " or ".join(map(repr, _NEUTRAL[name]))
            raise BadRequest(f"{name}={value!r} is not supported (only {only})", param=name)
    if body.model and body.model not in names:  # none or empty: the one model, as in vLLM
        raise NotFound(
            f"the model {body.model!r} does not exist; this server's is {names[0]!r}"
            + (f" (also {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""),
            param="model",
        )
    if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], str)):
        raise BadRequest("text prompts are not supported: send token ids", param="prompt")
    prompts = [body.prompt] if body.prompt and isinstance(body.prompt[0], int) else body.prompt
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BadRequest("prompt must hold at least one non-empty token-id list", param="prompt")
    if body.max_tokens not in (0, 1):
        unset = "max_tokens" not in body.model_fields_set
        raise BadRequest(
            f"max_tokens={body.max_tokens}{' (the default when it is not sent)' if unset else ''} "
            "is not supported: this teacher scores, it does not generate (send max_tokens 0 to "
            "score the prompt, or 1 for the teacher's next token)",
            param="max_tokens",
        )
    return prompts


@router.post("/completions", summary="OpenAI-style completions, for scoring token-id prompts")
async def completions(request: Request, _: Authorized, state: Ready) -> Response:
    body = await read_model(request, CompletionRequest, state.settings.max_body_bytes)
    prompts = check_supported(body, state.settings.served_names)
    prompt_k = (
        body.prompt_logprobs
        if body.prompt_logprobs is not None
        else (body.logprobs if body.echo else None)
    )
    generate = body.max_tokens == 1
    if generate and state.limits.max_top_k < 1:
        # The next token is read off the teacher's top-1: refused here in the words of what was
        # asked, rather than as a top_k of 1 the client never sent.
        raise BadRequest(
            "max_tokens=1 returns the teacher's next token, which needs its top-1 log-probs: "
            f"this server's max_top_k is {state.limits.max_top_k} (send max_tokens 0 to score "
            "the prompt only)",
            param="max_tokens",
        )
    k = max(prompt_k or 0, body.logprobs or 0, 1 if generate else 0)
    k_name = "prompt_logprobs" if body.prompt_logprobs == k else "logprobs"
    try:  # every prompt, whether or not log-probs are asked for, as vLLM checks them
        check_top_k(k, state.limits)
        for i, prompt in enumerate(prompts):
            where = f"prompt.{i}" if isinstance(body.prompt[0], list) else "prompt"  # as sent
            check_tokens(prompt, state.limits, where, extra=1 if generate else 0)
        check_response_entries(_entries(prompts, body, prompt_k, generate), "prompt")
    except InvalidRequest as exc:
        raise in_dialect(exc, k_name) from None
    # Position i of the scored sequence predicts prompt token i+1; a placeholder token after the
    # prompt makes the last position predict the next token, for greedy generation.
    seqs = [
        {"prompt_ids": p[:1], "completion_ids": p[1:] + ([0] if generate else [])} for p in prompts
    ]
    need_scores = [i for i, s in enumerate(seqs) if s["completion_ids"]]
    scores: dict[int, SequenceScore] = {}
    if need_scores and (prompt_k is not None or body.logprobs is not None or generate):
        try:
            temperature = 1.0 if body.temperature is None else body.temperature
            scoring = score_request(
                ScoreRequest(sequences=[seqs[i] for i in need_scores], top_k=k),
                state.backend,
                state.limits,
                state.metrics,
                want_ranks=True,
                wait_for_room=True,
                # temperature 0 is greedy: the top-1 token, no draw
                sample_temperature=temperature if generate and temperature > 0 else None,
            )
            result = await while_connected(request, scoring)
        except InvalidRequest as exc:
            raise in_dialect(exc, k_name) from None
        scores = dict(zip(need_scores, result.results))
    vocabulary = _Vocabulary(state.backend.tokenizer, state.backend.info.stop_token_ids)

    def response() -> dict:
        choices = [
            _choice(i, p, scores.get(i), body, prompt_k, generate, vocabulary)
            for i, p in enumerate(prompts)
        ]
        n_prompt = sum(len(p) for p in prompts)
        n_generated = len(prompts) if generate else 0
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.settings.served_names[0],
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_generated,
                "total_tokens": n_prompt + n_generated,
            },
        }

    return await json_built_off_the_loop(response)


def _entries(prompts: list[list[int]], body: CompletionRequest, prompt_k, generate) -> int:
    """The log-prob entries the response will hold: each scored prompt position's in
    prompt_logprobs and in echo's logprobs, and the generated token's."""
    per_position = (0 if prompt_k is None else prompt_k + 1) + (
        body.logprobs + 1 if body.echo and body.logprobs is not None else 0
    )
    per_generated = body.logprobs + 1 if generate and body.logprobs is not None else 0
    return sum((len(p) - 1) * per_position + per_generated for p in prompts)


class _Vocabulary:
    """What a response needs of the model's tokenizer: each token's text, decoded once a request
    (a position's k + 1 entries each name one), and where generation stops."""

    def __init__(self, tokenizer, stop_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self.one = functools.lru_cache(maxsize=None)(lambda token: tokenizer.decode([token]))

    def stop_reason(self, token: int) -> tuple[bool, int | None]:
        """As vLLM ends a completion at `token`: whether it stops, and the stop_reason it gives
        (None for the tokenizer's eos; the id for another eos generation_config lists)."""
        if token == self.tokenizer.eos_token_id:
            return True, None
        return (True, token) if token in self.stop_token_ids else (False, None)


def _choice(index, prompt, score, body, prompt_k, generate, vocabulary: _Vocabulary) -> dict:
    n = len(prompt) - 1  # scored prompt positions
    lists = _JsonScore.of(score) if score is not None else None
    new_ids = [lists.next_token()[0]] if generate else []
    # A token that ends the completion is a "stop" and, as in vLLM, not written in the text.
    stopped, stop_reason = vocabulary.stop_reason(new_ids[0]) if new_ids else (False, None)
    text_ids = (prompt if body.echo else []) + ([] if stopped else new_ids)
    choice = {
        "index": index,
        "text": vocabulary.tokenizer.decode(text_ids),
        "logprobs": None,
        "finish_reason": "stop" if stopped else "length",
        "stop_reason": stop_reason,
        "prompt_logprobs": None,
    }
    if prompt_k is not None:
        choice["prompt_logprobs"] = [None] + [
            _prompt_entry(lists, t, prompt[t + 1], prompt_k, vocabulary.one) for t in range(n)
        ]
    if body.logprobs is not None:
        choice["logprobs"] = _openai_logprobs(prompt, lists, body, generate, vocabulary.one)
    if body.return_token_ids:
        choice["prompt_token_ids"] = list(prompt)
        choice["token_ids"] = new_ids
    return choice


@dataclass
class _JsonScore:
    """A sequence's scores as Python lists, its log-probs made JSON numbers once for the whole
    sequence rather than number by number."""

    logprobs: list[float]
    ranks: list[int]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    sampled: tuple[int, float] | None

    @classmethod
    def of(cls, score: SequenceScore) -> _JsonScore:
        sampled = None
        if score.sampled is not None:
            sampled = (score.sampled[0], json_logprobs(score.sampled[1]))
        return cls(
            logprobs=json_logprobs(score.logprobs),
            ranks=score.ranks.tolist(),
            topk_ids=[] if score.topk_ids is None else score.topk_ids.tolist(),
            topk_logprobs=[] if score.topk_logprobs is None else json_logprobs(score.topk_logprobs),
            sampled=sampled,
        )

    def next_token(self) -> tuple[int, float]:
        """The generated token: sampled at the request's temperature, or the top-1 when greedy."""
        if self.sampled is not None:
            return self.sampled
        return self.topk_ids[-1][0], self.topk_logprobs[-1][0]


def _prompt_entry(score: _JsonScore, t: int, actual: int, k: int, decode_one) -> dict:
    """vLLM's shape and order: {token_id: {logprob, rank, decoded_token}}, the actual token first,
    then the top-k by rank (one that is the actual token keeps the first place)."""
    entry = {
        str(actual): {
            "logprob": score.logprobs[t],
            "rank": score.ranks[t],
            "decoded_token": decode_one(actual),
        }
    }
    for r in range(k):
        token = score.topk_ids[t][r]
        entry[str(token)] = {
            "logprob": score.topk_logprobs[t][r],
            "rank": r + 1,
            "decoded_token": decode_one(token),
        }
    return entry


def _openai_logprobs(prompt, score: _JsonScore, body, generate, decode_one) -> dict:
    """OpenAI's legacy shape over the echoed prompt (first token: null) and any generated token."""
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    k = body.logprobs

    def name(token_id: int) -> str:
        if body.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        return decode_one(token_id)

    def add(token_id: int, logprob: float | None, row: int | None) -> None:
        nonlocal offset
        text = name(token_id)
        tokens.append(text)
        token_logprobs.append(logprob)
        offsets.append(offset)
        offset += len(text)
        if row is None:
            top.append(None)
            return
        # As vLLM: the token itself first, then the top k, so logprobs 0 gives the token alone.
        entry = {text: logprob}
        entry.update((name(score.topk_ids[row][r]), score.topk_logprobs[row][r]) for r in range(k))
        top.append(entry)

    if body.echo:
        add(prompt[0], None, None)
        for t, token in enumerate(prompt[1:]):
            add(token, score.logprobs[t], t)
    if generate:
        add(*score.next_token(), len(prompt) - 1)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


@router.get(
    "/models",
    summary="The model this teacher serves, under each of its names (waits while it loads)",
)
async def models(_: Authorized, state: Loaded) -> dict:  # as vLLM: every /v1 route needs the key
    settings, info = state.settings, state.backend.info
    # As vLLM: a card per served name, each rooted at the folder; without names, the folder's path.
    names = settings.served_model_name or settings.served_names[:1]
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "opd",
                "root": info.model,
                "parent": None,
                "max_model_len": info.max_seq_len,
                "permission": [],
            }
            for name in names
        ],
    }
