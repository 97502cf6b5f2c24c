"""Both wire forms of the protocol round-trip exactly, and bad bodies fail with the field named."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from shared import protocol
from shared.errors import InvalidRequest, MalformedBody, PayloadTooLarge, TeacherError
from shared.protocol import (
    LOWEST_LOGPROB,
    FrameReader,
    ScoreRequest,
    ScoreResult,
    SequenceScore,
    Usage,
    decode_request,
    decode_response,
    decode_stream_item,
    encode_request,
    encode_response,
    frame_bytes,
    pack_frame,
    validate_request,
)
from tests.conftest import strict_json

REQUEST = ScoreRequest.model_validate(
    {
        "sequences": [
            {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5]},
            {"prompt_ids": [1], "completion_ids": [6, 7, 8, 2**31 - 1]},
        ],
        "top_k": 3,
        "candidate_ids": [[[1, 2], []], [[3], [4, 5, 6], [7], [0]]],
        "temperature": 0.7,
        "max_positions": 4,
    }
)


def make_result(rng: np.random.Generator) -> ScoreResult:
    def score(n: int, k: int) -> SequenceScore:
        return SequenceScore(
            logprobs=-rng.random(n, dtype=np.float32) * 10,
            topk_ids=rng.integers(0, 1000, (n, k)).astype(np.int32),
            topk_logprobs=-np.sort(rng.random((n, k), dtype=np.float32), axis=1),
            candidate_logprobs=[
                -rng.random(int(c), dtype=np.float32) for c in rng.integers(0, 4, n)
            ],
        )

    return ScoreResult(
        "m", "sha256:x", [score(5, 3), score(1, 3)], Usage(prompt_tokens=4, scored_tokens=6)
    )


@pytest.mark.parametrize("binary", [False, True])
def test_request_round_trip_is_exact(binary):
    assert decode_request(encode_request(REQUEST, binary), binary) == REQUEST


@pytest.mark.parametrize("binary", [False, True])
def test_response_round_trip_is_exact(binary):
    result = make_result(np.random.default_rng(0))
    back = decode_response(encode_response(result, binary), binary)
    assert back.model == result.model and back.usage == result.usage
    assert len(back.results) == len(result.results) > 1
    for a, b in zip(result.results, back.results):
        assert np.array_equal(a.logprobs, b.logprobs) and b.logprobs.dtype == np.float32
        assert np.array_equal(a.topk_ids, b.topk_ids)
        assert np.array_equal(a.topk_logprobs, b.topk_logprobs)
        assert len(a.candidate_logprobs) == len(b.candidate_logprobs)
        for x, y in zip(a.candidate_logprobs, b.candidate_logprobs):
            assert np.array_equal(x, y)


def test_json_and_binary_responses_carry_the_same_numbers():
    result = make_result(np.random.default_rng(1))
    from_json = decode_response(encode_response(result, False), False)
    from_bin = decode_response(encode_response(result, True), True)
    assert len(from_json.results) == len(from_bin.results) == len(result.results)
    for a, b in zip(from_json.results, from_bin.results):
        assert np.array_equal(a.logprobs, b.logprobs)
        assert np.array_equal(a.topk_logprobs, b.topk_logprobs)


def test_a_log_prob_of_minus_inf_is_vllms_floor_in_json_and_exact_in_binary():
    def f32(*values):
        return np.array(values, dtype=np.float32)

    ruled_out = SequenceScore(
        logprobs=f32(-np.inf, -1.5, np.nan),
        topk_ids=np.array([[3], [4], [5]], dtype=np.int32),
        topk_logprobs=f32([-0.5], [-np.inf], [np.inf]),  # +inf: a broken model, still JSON
        candidate_logprobs=[f32(-np.inf), f32(), f32(-20000.0, -2.0)],
    )
    result = ScoreResult("m", "sha256:x", [ruled_out], Usage(prompt_tokens=1, scored_tokens=3))
    body = strict_json(encode_response(result, False))["results"][0]
    assert body["logprobs"] == [LOWEST_LOGPROB, -1.5, LOWEST_LOGPROB]
    assert body["topk_logprobs"] == [[-0.5], [LOWEST_LOGPROB], [0.0]]
    assert body["candidate_logprobs"] == [[LOWEST_LOGPROB], [], [LOWEST_LOGPROB, -2.0]]
    back = decode_response(encode_response(result, True), True).results[0]
    assert np.isneginf(back.logprobs[0]) and np.isnan(back.logprobs[2])
    assert np.isneginf(back.topk_logprobs[1, 0]) and back.candidate_logprobs[2][0] == -20000.0


def test_binary_arrays_are_little_endian_int32_and_float32():
    body = msgpack.unpackb(encode_request(REQUEST, True))
    assert body["sequences"][0]["prompt_ids"] == np.array([1, 2, 3], "<i4").tobytes()
    out = msgpack.unpackb(encode_response(make_result(np.random.default_rng(2)), True))
    assert len(out["results"][0]["logprobs"]) == 5 * 4


def test_binary_is_smaller_than_json():
    result = make_result(np.random.default_rng(3))
    assert len(encode_response(result, True)) < len(encode_response(result, False)) / 2


@pytest.mark.parametrize(
    "body, error, param",
    [
        (b"[", MalformedBody, None),
        (json.dumps({"sequences": "x"}).encode(), InvalidRequest, "sequences"),
        (
            json.dumps({"sequences": [{"prompt_ids": [1]}]}).encode(),
            InvalidRequest,
            "sequences.0.completion_ids",
        ),
        (json.dumps([1, 2]).encode(), MalformedBody, None),  # no request at all
    ],
)
def test_bad_json_bodies(body, error, param):
    with pytest.raises(error) as info:
        decode_request(body, binary=False)
    assert info.value.param == param


def test_bad_binary_ragged_counts():
    body = msgpack.unpackb(encode_request(REQUEST, True))
    body["candidate_ids"][0]["counts"] = np.array([5, 5], "<i4").tobytes()
    with pytest.raises(MalformedBody) as info:
        decode_request(msgpack.packb(body), binary=True)
    assert info.value.param == "candidate_ids.0"


def test_binary_candidates_for_more_positions_than_a_sequence_has_are_refused_unread():
    """Two million empty rows fit in 8 MB of counts; building them took seconds on the event loop."""
    huge = {"values": b"", "counts": np.zeros(2_000_000, "<i4").tobytes()}
    body = msgpack.unpackb(encode_request(REQUEST, True))
    body["candidate_ids"][0] = huge
    with pytest.raises(InvalidRequest, match="2000000 positions; its sequence has 2 completion"):
        decode_request(msgpack.packb(body), binary=True)
    # An entry more than there are sequences is refused before any entry is read.
    body = msgpack.unpackb(encode_request(REQUEST, True))
    body["candidate_ids"].append(huge)
    with pytest.raises(InvalidRequest, match="3 entries for 2 sequences") as refused:
        decode_request(msgpack.packb(body), binary=True)
    assert refused.value.param == "candidate_ids"


def test_json_candidates_for_more_positions_than_a_sequence_has_are_refused_unvalidated(
    monkeypatch,
):
    """Validation built each row of 2.8 million empty ones (8 MiB) for 2.3 s before it counted."""
    body = json.loads(encode_request(REQUEST, False))
    body["candidate_ids"][0] = [[]] * 100_000
    monkeypatch.setattr(protocol.ScoreRequest, "model_validate", None)  # never reached
    with pytest.raises(InvalidRequest, match="100000 positions; its sequence has 2 completion"):
        decode_request(json.dumps(body).encode(), binary=False)


@pytest.mark.parametrize("ids", [(True, 2), [1, "2"], (1, 2.0)])
def test_token_ids_must_be_integers_in_a_list_or_a_tuple(ids):
    with pytest.raises(ValidationError, match="token ids are integers"):
        ScoreRequest(sequences=[{"prompt_ids": ids, "completion_ids": [5]}])


def test_numpy_integers_from_a_clients_arrays_are_token_ids():
    ids = np.array([1, 21, 18], dtype=np.int64)
    request = ScoreRequest(sequences=[{"prompt_ids": list(ids), "completion_ids": (np.int32(5),)}])
    assert request.sequences[0].prompt_ids == [1, 21, 18]


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_frame_reader_splits_frames_whatever_the_chunking(chunk):
    stream = b"".join(frame_bytes(p) for p in (b"a", b"", b"xyz" * 50))
    reader = FrameReader(1000)
    frames = [f for i in range(0, len(stream), chunk) for f in reader.feed(stream[i : i + chunk])]
    reader.finish()
    assert frames == [b"a", b"", b"xyz" * 50]


def test_frame_reader_hands_over_whole_frames_before_broken_framing():
    reader = FrameReader(100)
    oversize = (2**30).to_bytes(4, "little")
    assert reader.feed(frame_bytes(b"a") + frame_bytes(b"b") + oversize) == [b"a", b"b"]
    with pytest.raises(MalformedBody, match="exceeds 100 bytes"):
        reader.finish()
    with pytest.raises(MalformedBody, match="exceeds 100 bytes"):
        reader.feed(b"more")


def test_frame_reader_refuses_a_stream_that_ends_inside_a_frame():
    reader = FrameReader(100)
    assert reader.feed(frame_bytes(b"abc")[:-1]) == []
    with pytest.raises(MalformedBody, match="ended inside a frame"):
        reader.finish()


def test_frame_reader_can_read_past_an_oversize_frame_and_go_on():
    reader = FrameReader(100, skip_oversize=True)
    big = frame_bytes(b"x" * 150)
    stream = frame_bytes(b"a") + big + frame_bytes(b"b")
    frames = [f for i in range(0, len(stream), 7) for f in reader.feed(stream[i : i + 7])]
    assert frames[0] == b"a" and frames[2] == b"b" and len(frames) == 3
    assert isinstance(frames[1], PayloadTooLarge) and "150 bytes exceeds 100" in str(frames[1])
    reader.finish()


def test_a_stream_ending_inside_an_oversize_frame_says_its_framing_may_be_broken():
    """Refused at its header as too large; that the stream then ends short of the length it
    declared says more: four bytes of garbage read as a length look like a huge frame."""
    cut = FrameReader(100, skip_oversize=True)
    [refused] = cut.feed(frame_bytes(b"x" * 150)[:60])
    assert isinstance(refused, PayloadTooLarge)
    with pytest.raises(MalformedBody, match="ended 94 bytes before .*broken framing"):
        cut.finish()


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"sequences": [{"prompt_ids": [-1] * 500_000, "completion_ids": [1]}]},
            "sequences.0.prompt_ids.0",
        ),
        ({"sequences": [1] * 500_000}, "sequences.0"),
        (
            {"sequences": [{"prompt_ids": [-1], "completion_ids": [1]}] * 200_000},
            "sequences.0.prompt_ids.0",
        ),
        (
            {
                "sequences": [{"prompt_ids": [1], "completion_ids": [1]}],
                "candidate_ids": [[[-1]] * 500_000],
            },
            "candidate_ids.0.0.0",
        ),
    ],
)
def test_a_list_of_many_bad_items_is_one_error_at_its_first(body, param):
    """One error object per bad item would take seconds and GBs for a body within the size limit."""
    with pytest.raises(InvalidRequest) as error:
        validate_request(body)
    assert error.value.param == param and "more)" not in str(error.value)


@pytest.mark.parametrize(
    "item",
    [
        {"frame": "x", "error": {"message": "boom"}},
        {"frame": 0, "error": "boom"},
        {"frame": 0, "index": 1.5, "error": {"message": "boom"}},
        {"frame": True, "index": 0, "score": {}},
        {"frame": 0, "score": {}},  # a score for no sequence
    ],
)
def test_a_stream_frame_of_other_types_is_not_a_teachers_answer(item):
    """The trainer compares frame numbers and reads errors' messages: a frame of other types
    failed there with a bare TypeError or AttributeError."""
    with pytest.raises(TeacherError, match="not a teacher's stream frame"):
        decode_stream_item(pack_frame(item)[4:])


def test_binary_candidate_rows_must_add_up_to_their_values():
    """Counts [5, -2] over 3 values were cut into rows of 3 and 0 without a word."""
    result = make_result(np.random.default_rng(0))
    packed = msgpack.unpackb(encode_response(result, binary=True))
    packed["results"][0]["candidate_logprobs"]["counts"] = np.array([5, -2], "<i4").tobytes()
    with pytest.raises(TeacherError, match="row lengths sum to 3"):
        decode_response(msgpack.packb(packed), binary=True)
