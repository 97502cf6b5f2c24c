"""The teacher's wire protocol: `POST /score` messages in JSON and in binary (msgpack) form.

JSON request (the public contract):
    {"sequences": [{"prompt_ids": [int], "completion_ids": [int]}], "top_k": 0,
     "candidate_ids": null, "temperature": 1.0, "max_positions": null}
JSON response:
    {"model": str, "tokenizer_fingerprint": str,
     "results": [{"logprobs": [float], "topk_ids": [[int]] | null, "topk_logprobs": [[float]] | null,
                  "candidate_logprobs": [[float]] | null}],
     "usage": {"prompt_tokens": int, "scored_tokens": int}}

`logprobs[i]` is the teacher's log-prob of `completion_ids[i]` given the prompt and completion_ids[:i],
computed as log_softmax(logits / temperature). Only the first `max_positions` completion tokens are
scored when it is set. `candidate_ids[s][i]` lists token ids whose log-probs are wanted at position i
of sequence s (for example the student's own top-k).

Streaming form (`POST /score/stream`, Content-Type `application/x-opd-frames`): the body is a series
of frames, each a 4-byte little-endian length and a msgpack map. Each request frame is one binary
ScoreRequest (a micro-batch of rollouts, sent as soon as it is ready); the response streams one frame
per scored sequence, {"frame": i, "index": j, "score": <binary SequenceScore>, "compute_s": float},
in the order they finish, an {"frame": i, "error": {...}} frame for a frame that was refused (or for
broken framing, which ends the input once the whole frames before it are answered), an
{"frame": i, "index": j, "error": {...}} frame for a sequence that could not be scored (its forward
failed: the frame's other sequences are still answered), and a last
{"done": true, "frames": n, "sequences": m} frame (m: the sequences scored). The stream's response
headers name the teacher's tokenizer (FINGERPRINT_HEADER), as a /score answer's body does: behind a
load balancer each call may reach another replica, and a client holds every answer to the tokenizer
it connected with.

Binary form (Content-Type / Accept `application/msgpack`): the same maps, with every id array packed
as little-endian int32 bytes and every log-prob array as little-endian float32 bytes. Ragged lists of
lists (candidates) travel as {"values": flat bytes, "counts": int32 bytes per position}; top-k arrays
are row-major [positions, k] with "top_k" giving k. Server-side log-probs are float32, so the JSON
and binary forms carry identical numbers, but one: JSON has no infinity, so a log-prob of -inf (a
token the model rules out), or one lower than LOWEST_LOGPROB (-9999.0), is written LOWEST_LOGPROB
there, as vLLM's JSON answers do (NaN too).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import msgpack
import numpy as np
import pydantic_core
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from shared.errors import (
    InvalidRequest,
    MalformedBody,
    PayloadTooLarge,
    TeacherError,
    from_validation,
)

JSON = "application/json"
MSGPACK = "application/msgpack"
MSGPACK_TYPES = (MSGPACK, "application/x-msgpack", "application/vnd.msgpack")
FRAMES = "application/x-opd-frames"
FINGERPRINT_HEADER = "X-OPD-Tokenizer-Fingerprint"
_LENGTH = struct.Struct("<I")

# The floor of a log-prob in a JSON answer (here and in the dialect routes), vLLM's: -inf is no JSON
# number (Python writes -Infinity, which strict parsers refuse), and a client reading null as a
# number fails.
LOWEST_LOGPROB = -9999.0


# Python's and numpy's integer types (numpy's as a client builds requests from arrays).
_INT_TYPES = frozenset({int, *(np.dtype(c).type for c in np.typecodes["AllInteger"])})


def _integers_only(ids: Any) -> Any:
    # pydantic would pass JSON true/false as ids 1/0, "5" as 5 and 5.0 as 5: client bugs to report,
    # not tokens to score. The types are collected in C (a check per id made validation 3x slower).
    if isinstance(ids, (list, tuple)) and not set(map(type, ids)) <= _INT_TYPES:
        raise ValueError("token ids are integers (not booleans, strings or floats)")
    return ids


def _an_integer(value: Any) -> Any:
    if value is not None and type(value) not in _INT_TYPES:
        raise ValueError(f"must be an integer, not {type(value).__name__}")
    return value


def _a_number(value: Any) -> Any:
    if isinstance(value, (str, bytes, bool)):
        raise ValueError(f"must be a number, not {type(value).__name__}")
    return value


# Scoring divides float32 logits by the temperature: below 0.01 they overflow to inf and NaN (vLLM
# raises such temperatures to 0.01 for the same reason); above 1e4 every distribution is uniform.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1e4


# The bounds go before the validator: placed after it (or on `X | None`) they would still be checked,
# but the OpenAPI document would show them as unknown "ge"/"le" keywords, not minimum/maximum.
def number(**bounds: float) -> Any:
    """A finite float, refusing booleans and strings, within Field's ge/gt/le/lt `bounds`."""
    return Annotated[float, Field(allow_inf_nan=False, **bounds), BeforeValidator(_a_number)]


def count(**bounds: int) -> Any:
    """An integer, refusing booleans, strings and floats (a client bug), within `bounds`."""
    return Annotated[int, Field(**bounds), BeforeValidator(_an_integer)]


Temperature = number(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)


def list_of(kind: Any) -> Any:
    """A list that reports only its first bad item: a body of a million bad ids would otherwise
    build a million error objects (seconds of the event loop and GBs) to report one."""
    return Annotated[list[kind], Field(fail_fast=True)]


# int32 on the binary wire, so ids must fit in it.
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list_of(TokenId), BeforeValidator(_integers_only)]
Count = count()


class ScoreSequence(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_ids: TokenIds = Field(min_length=1, description="Token ids of the context.")
    completion_ids: TokenIds = Field(min_length=1, description="Token ids to score.")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sequences: list_of(ScoreSequence) = Field(min_length=1)
    top_k: count(ge=0) = Field(0, description="Also return the teacher's k most likely tokens.")
    candidate_ids: list_of(list_of(TokenIds)) | None = Field(
        None, description="Per sequence, per scored position: token ids to score there."
    )
    temperature: Temperature = Field(1.0, description="Divides the logits.")
    max_positions: count(ge=1) | None = Field(
        None, description="Score only the first H completion tokens (the rollout horizon)."
    )

    def scored_positions(self, index: int) -> int:
        n = len(self.sequences[index].completion_ids)
        return n if self.max_positions is None else min(n, self.max_positions)


class SequenceScoreModel(BaseModel):
    logprobs: list[float]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    candidate_logprobs: list[list[float]] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    scored_tokens: int


class ScoreResponse(BaseModel):
    """The JSON response, as a schema (the OpenAPI docs); code handles it as `ScoreResult`."""

    model: str
    tokenizer_fingerprint: str
    results: list[SequenceScoreModel]
    usage: Usage


@dataclass
class SequenceScore:
    """One sequence's scores as arrays; n = scored positions."""

    logprobs: np.ndarray  # float32 [n]
    topk_ids: np.ndarray | None = None  # int32 [n, k]
    topk_logprobs: np.ndarray | None = None  # float32 [n, k]
    candidate_logprobs: list[np.ndarray] | None = None  # n arrays, float32 [c_i]
    ranks: np.ndarray | None = None  # int64 [n], 1 = most likely; only when a dialect asks for it
    sampled: tuple[int, float] | None = None  # (token, log-prob) drawn at the last position


@dataclass
class ScoreResult:
    model: str
    tokenizer_fingerprint: str
    results: list[SequenceScore]
    usage: Usage


# ---- requests ----


def validate_request(data: Any) -> ScoreRequest:
    """Parse a decoded body into a ScoreRequest, or raise InvalidRequest naming the field."""
    try:
        request = ScoreRequest.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc.errors(include_url=False)) from None
    if request.candidate_ids is not None:
        if len(request.candidate_ids) != len(request.sequences):
            raise InvalidRequest(
                f"candidate_ids has {len(request.candidate_ids)} entries for "
                f"{len(request.sequences)} sequences",
                param="candidate_ids",
            )
        for s, per_position in enumerate(request.candidate_ids):
            want = request.scored_positions(s)
            if len(per_position) != want:
                raise InvalidRequest(
                    f"candidate_ids[{s}] has {len(per_position)} positions; sequence {s} has "
                    f"{want} scored positions",
                    param=f"candidate_ids.{s}",
                )
    return request


def encode_request(request: ScoreRequest, binary: bool) -> bytes:
    if not binary:
        return request.model_dump_json().encode()
    body: dict[str, Any] = {
        "sequences": [
            {"prompt_ids": _i32(s.prompt_ids), "completion_ids": _i32(s.completion_ids)}
            for s in request.sequences
        ],
        "top_k": request.top_k,
        "candidate_ids": None
        if request.candidate_ids is None
        else [_pack_ragged(rows, _i32) for rows in request.candidate_ids],
        "temperature": request.temperature,
        "max_positions": request.max_positions,
    }
    return msgpack.packb(body, use_bin_type=True)


def decode_request(body: bytes, binary: bool) -> ScoreRequest:
    data = _unpack(body) if binary else load_json(body)
    data = an_object(data, "msgpack map" if binary else "JSON object")
    if binary:
        data = _unpack_request_arrays(data)
    else:
        _refuse_extra_candidate_rows(data)
    return validate_request(data)


def _refuse_extra_candidate_rows(data: dict) -> None:
    """JSON's candidate rows past a sequence's completion tokens, refused before validation builds
    them (8 MiB of empty rows took 2.3 s and 400 MB of it, on top of json.loads's 1 s), as
    _unpack_ragged refuses the binary form's."""
    sequences, candidates = data.get("sequences"), data.get("candidate_ids")
    if not (isinstance(sequences, list) and isinstance(candidates, list)):
        return  # validation names what is wrong
    for i, (rows, sequence) in enumerate(zip(candidates, sequences)):
        bound = _completion_tokens(sequence)
        if isinstance(rows, list) and bound is not None and len(rows) > bound:
            raise InvalidRequest(
                f"candidate_ids.{i} has {len(rows)} positions; its sequence has {bound} "
                "completion tokens",
                param=f"candidate_ids.{i}",
            )


def _unpack_request_arrays(data: dict) -> dict:
    out = dict(data)
    sequences = data.get("sequences")
    if isinstance(sequences, list):
        out["sequences"] = [
            {k: _ids_list(v, f"sequences.{i}.{k}") for k, v in s.items()}
            if isinstance(s, dict)
            else s
            for i, s in enumerate(sequences)
        ]
    candidates = data.get("candidate_ids")
    if isinstance(candidates, list) and isinstance(out.get("sequences"), list):
        if len(candidates) != len(out["sequences"]):  # before any is unpacked
            raise InvalidRequest(
                f"candidate_ids has {len(candidates)} entries for {len(out['sequences'])} "
                "sequences",
                param="candidate_ids",
            )
        bounds = [_completion_tokens(s) for s in out["sequences"]]
        if None not in bounds:  # else validation names the bad sequence first
            out["candidate_ids"] = [
                _unpack_ragged(c, "<i4", f"candidate_ids.{i}", bound)
                for i, (c, bound) in enumerate(zip(candidates, bounds))
            ]
    return out


def _completion_tokens(sequence: Any) -> int | None:
    """How many completion tokens a sequence has, if it says (validation checks the rest):
    candidates for more positions than that can be refused unread."""
    completion = sequence.get("completion_ids") if isinstance(sequence, dict) else None
    return len(completion) if isinstance(completion, list) else None


# ---- responses ----


def encode_response(result: ScoreResult, binary: bool) -> bytes:
    if binary:
        return msgpack.packb(
            {
                "model": result.model,
                "tokenizer_fingerprint": result.tokenizer_fingerprint,
                "results": [_pack_score(r) for r in result.results],
                "usage": result.usage.model_dump(),
            },
            use_bin_type=True,
        )
    body = {
        "model": result.model,
        "tokenizer_fingerprint": result.tokenizer_fingerprint,
        "results": [
            {
                "logprobs": json_logprobs(r.logprobs),
                "topk_ids": None if r.topk_ids is None else r.topk_ids.tolist(),
                "topk_logprobs": None
                if r.topk_logprobs is None
                else json_logprobs(r.topk_logprobs),
                "candidate_logprobs": None
                if r.candidate_logprobs is None
                else [json_logprobs(c) for c in r.candidate_logprobs],
            }
            for r in result.results
        ],
        "usage": result.usage.model_dump(),
    }
    # pydantic-core's writer, not json.dumps: 10x faster on a large answer, which is written on
    # the server's event loop (64 sequences x 1,792 positions at top_k 20: 0.35 s against 3.4 s).
    return pydantic_core.to_json(body)


def json_logprobs(values: Any) -> Any:
    """Log-probs (a number or an array) as JSON numbers: -inf, NaN and anything lower than
    LOWEST_LOGPROB are LOWEST_LOGPROB; +inf, which no log-softmax gives, is 0.0."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=-np.inf, posinf=0.0)
    return np.maximum(values, np.float32(LOWEST_LOGPROB)).tolist()


@contextmanager
def _a_teachers_answer(what: str) -> Iterator[None]:
    """Decoding an answer (on the client's side): one that is not what a teacher sends, from a
    server that only looks like one, raises TeacherError saying so, not a KeyError."""
    try:
        yield
    except (
        MalformedBody,
        KeyError,
        IndexError,
        TypeError,
        ValueError,
        AttributeError,
        OverflowError,  # a JSON number past float32 or int32
    ) as exc:
        raise TeacherError(f"the answer is not {what} ({type(exc).__name__}: {exc})") from None


def decode_response(body: bytes, binary: bool) -> ScoreResult:
    with _a_teachers_answer("a teacher's score result"):
        data = _unpack(body) if binary else load_json(body)
        read = _unpack_score if binary else _json_score
        return ScoreResult(
            model=data["model"],
            tokenizer_fingerprint=data["tokenizer_fingerprint"],
            results=[read(r) for r in data["results"]],
            usage=Usage(**data["usage"]),
        )


def _pack_score(r: SequenceScore) -> dict:
    return {
        "logprobs": _f32(r.logprobs),
        "top_k": 0 if r.topk_ids is None else int(r.topk_ids.shape[1]),
        "topk_ids": None if r.topk_ids is None else _i32(r.topk_ids),
        "topk_logprobs": None if r.topk_logprobs is None else _f32(r.topk_logprobs),
        "candidate_logprobs": None
        if r.candidate_logprobs is None
        else _pack_ragged(r.candidate_logprobs, _f32),
    }


def _array(data: bytes, dtype: str) -> np.ndarray:
    """A writable copy: a view of the message's bytes would be read-only, unlike the JSON form's."""
    return np.frombuffer(data, dtype=dtype).copy()


def _unpack_score(d: dict) -> SequenceScore:
    """A binary score; its arrays must have a row per log-prob (ValueError otherwise, as a
    reshape to the JSON form's shape refuses them)."""
    logprobs = _array(d["logprobs"], "<f4")
    n, k = len(logprobs), d["top_k"]
    if not _an_int(k) or k < 0:
        raise ValueError(f"top_k {k!r} is not a count")
    candidates = d["candidate_logprobs"]
    candidates = None if candidates is None else _split_ragged(candidates, "<f4")
    if candidates is not None and len(candidates) != n:
        raise ValueError(f"{len(candidates)} candidate rows for {n} positions")
    return SequenceScore(
        logprobs=logprobs,
        topk_ids=None if d["topk_ids"] is None else _array(d["topk_ids"], "<i4").reshape(n, k),
        topk_logprobs=None
        if d["topk_logprobs"] is None
        else _array(d["topk_logprobs"], "<f4").reshape(n, k),
        candidate_logprobs=candidates,
    )


def _json_score(d: dict) -> SequenceScore:
    def f32(rows):
        return None if rows is None else np.asarray(rows, dtype=np.float32)

    n = len(d["logprobs"])
    topk_ids = d.get("topk_ids")
    return SequenceScore(
        logprobs=np.asarray(d["logprobs"], dtype=np.float32),
        topk_ids=None if topk_ids is None else np.asarray(topk_ids, dtype=np.int32).reshape(n, -1),
        topk_logprobs=None if topk_ids is None else f32(d["topk_logprobs"]).reshape(n, -1),
        candidate_logprobs=None
        if d.get("candidate_logprobs") is None
        else [f32(c) for c in d["candidate_logprobs"]],
    )


# ---- streaming frames ----


@dataclass
class StreamItem:
    """One response frame of /score/stream: a sequence's score, a refused frame (or with `index`, a
    sequence that could not be scored), or the end."""

    frame: int | None = None
    index: int | None = None
    score: SequenceScore | None = None
    compute_s: float = 0.0  # teacher forward time of this sequence; 0: not timed (vllm)
    error: dict | None = None
    done: bool = False
    frames: int | None = None  # on the done item: frames and sequences the teacher answered
    sequences: int | None = None


def pack_frame(obj: Any) -> bytes:
    return frame_bytes(msgpack.packb(obj, use_bin_type=True))


def frame_bytes(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


def encode_request_frame(request: ScoreRequest) -> bytes:
    return frame_bytes(encode_request(request, binary=True))


class FrameReader:
    """Splits a byte stream into frame payloads, whatever the chunking.

    A frame larger than `max_frame_bytes` is broken framing (MalformedBody), or, with
    `skip_oversize`, a PayloadTooLarge in that frame's place: its bytes are read past, not kept,
    and the frames after it come out as usual (the teacher answers such a frame as /score answers
    a body that is too large, and goes on with the others)."""

    def __init__(self, max_frame_bytes: int, skip_oversize: bool = False):
        self.max_frame_bytes = max_frame_bytes
        self.skip_oversize = skip_oversize
        self._buffer = bytearray()
        self._broken: MalformedBody | None = None
        self._skip = 0  # bytes still to read past of an oversize frame

    def feed(self, data: bytes) -> list[bytes | PayloadTooLarge]:
        """The whole frames so far. Broken framing raises MalformedBody, on the next call when the
        same data held whole frames before it, so those are never lost."""
        if self._broken is not None:
            raise self._broken
        self._buffer += data
        frames: list[bytes | PayloadTooLarge] = []
        while True:
            if self._skip:
                passed = min(self._skip, len(self._buffer))
                del self._buffer[:passed]
                self._skip -= passed
                if self._skip:
                    break
            if len(self._buffer) < _LENGTH.size:
                break
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > self.max_frame_bytes:
                message = f"frame of {size} bytes exceeds {self.max_frame_bytes} bytes"
                if self.skip_oversize:
                    frames.append(PayloadTooLarge(message))
                    del self._buffer[: _LENGTH.size]
                    self._skip = size
                    continue
                self._broken = MalformedBody(message)
                if frames:
                    return frames
                raise self._broken
            if len(self._buffer) < _LENGTH.size + size:
                break
            frames.append(bytes(self._buffer[_LENGTH.size : _LENGTH.size + size]))
            del self._buffer[: _LENGTH.size + size]
        return frames

    def finish(self) -> None:
        """The stream has ended: MalformedBody if it ended inside a frame. One being read past has
        had its answer, but a stream that ends before the length it declared is more likely
        broken framing (a length prefix that is no length reads as an oversize frame) than a
        frame that was too large, so that is said too."""
        if self._broken is not None:
            raise self._broken
        if self._skip:
            raise MalformedBody(
                f"stream ended {self._skip} bytes before the end of the oversize frame it began: "
                "a cut-off frame, or a length prefix that is not a frame's length (broken framing)"
            )
        if self._buffer:
            raise MalformedBody(f"stream ended inside a frame ({len(self._buffer)} bytes left)")


def encode_stream_score(frame: int, index: int, score: SequenceScore, compute_s: float) -> bytes:
    return pack_frame(
        {"frame": frame, "index": index, "score": _pack_score(score), "compute_s": compute_s}
    )


def encode_stream_error(frame: int, err: TeacherError, index: int | None = None) -> bytes:
    """Frame `frame` was refused (or broke the stream's framing), or with `index`, that sequence of
    it could not be scored; saying why in the error shape."""
    item: dict[str, Any] = {"frame": frame, "error": err.to_body()["error"]}
    if index is not None:
        item["index"] = index
    return pack_frame(item)


def encode_stream_done(frames: int, sequences: int) -> bytes:
    return pack_frame({"done": True, "frames": frames, "sequences": sequences})


def decode_stream_item(payload: bytes) -> StreamItem:
    with _a_teachers_answer("a teacher's stream frame"):
        d = _unpack(payload)
        if d.get("done"):
            frames, sequences = d.get("frames"), d.get("sequences")
            if not all(isinstance(n, int) for n in (frames, sequences)):
                raise ValueError(f"done frame counts {frames!r}, {sequences!r} are not integers")
            return StreamItem(done=True, frames=frames, sequences=sequences)
        frame, index = d["frame"], d.get("index")
        if not _an_int(frame) or not (index is None or _an_int(index)):
            raise ValueError(f"frame {frame!r}, index {index!r}: not integers")
        if "error" in d:
            if not isinstance(d["error"], dict):
                raise ValueError(f"error {d['error']!r} is not an error object")
            return StreamItem(frame=frame, index=index, error=d["error"])
        if index is None:
            raise ValueError("a score frame names no sequence (index)")
        score = _unpack_score(d["score"])
        compute_s = d.get("compute_s", 0.0)
        if not isinstance(compute_s, (int, float)) or isinstance(compute_s, bool):
            raise ValueError(f"compute_s {compute_s!r} is not a number")
        return StreamItem(frame, index, score, compute_s)


def _an_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- packing helpers ----


def _i32(values: Any) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def _f32(values: Any) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def _pack_ragged(rows: list, pack) -> dict:
    counts = [len(r) for r in rows]
    flat = np.concatenate([np.asarray(r) for r in rows]) if rows else np.zeros(0)
    return {"values": pack(flat), "counts": _i32(counts)}


def _split_ragged(packed: dict, dtype: str) -> list[np.ndarray]:
    values, counts = _array(packed["values"], dtype), np.frombuffer(packed["counts"], dtype="<i4")
    if counts.min(initial=0) < 0 or int(counts.sum()) != len(values):
        raise ValueError(f"row lengths sum to {int(counts.sum())}, not the {len(values)} values")
    return _split(values, counts)


def _split(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """`values` cut into consecutive parts of `counts` items each."""
    return np.split(values, np.cumsum(counts)[:-1]) if len(counts) else []


def _unpack_ragged(packed: Any, dtype: str, where: str, most_rows: int | None = None) -> Any:
    """The rows of a packed ragged list; more than `most_rows` of them are refused before they
    are built (millions of empty rows fit in a few MB of counts and would take seconds)."""
    if not isinstance(packed, dict) or not {"values", "counts"} <= packed.keys():
        raise MalformedBody(f"{where}: expected {{'values': bytes, 'counts': bytes}}", param=where)
    values = _frombuffer(packed["values"], dtype, f"{where}.values")
    counts = _frombuffer(packed["counts"], "<i4", f"{where}.counts")
    if counts.min(initial=0) < 0 or int(counts.sum()) != len(values):
        raise MalformedBody(f"{where}: counts do not add up to the number of values", param=where)
    if most_rows is not None and len(counts) > most_rows:
        raise InvalidRequest(
            f"{where} has {len(counts)} positions; its sequence has {most_rows} completion tokens",
            param=where,
        )
    flat, ends = values.tolist(), np.cumsum(counts).tolist()
    return [flat[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def _ids_list(value: Any, where: str) -> Any:
    # Anything that is not bytes is left for validation to reject with the field's name.
    return _frombuffer(value, "<i4", where).tolist() if isinstance(value, bytes) else value


def _frombuffer(value: Any, dtype: str, where: str) -> np.ndarray:
    if not isinstance(value, bytes):
        raise MalformedBody(f"{where}: expected packed bytes", param=where)
    if len(value) % 4:
        raise MalformedBody(
            f"{where}: byte length {len(value)} is not a multiple of 4", param=where
        )
    return np.frombuffer(value, dtype=dtype)


def _unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedBody(f"body is not valid msgpack ({type(exc).__name__})") from None


def an_object(data: Any, form: str) -> dict:
    """A decoded body that must be a map: a list or a number is no request at all, not a bad field."""
    if not isinstance(data, dict):
        raise MalformedBody(f"body must be a {form}")
    return data


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise MalformedBody("body is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # also an integer of more digits than Python converts, or bad UTF-8
        raise MalformedBody(f"body is not valid JSON ({exc})") from None
