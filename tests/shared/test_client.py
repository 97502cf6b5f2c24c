"""The client against real teacher servers: fingerprint check, retries, replicas, failover."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import re
import struct
import threading
import time

import httpx
import msgpack
import numpy as np
import pytest

from opd.bundled import TEACHER_PATH
from services.teacher.app import create_app
from services.teacher.settings import TeacherSettings
from shared.client import (
    AsyncTeacherClient,
    TeacherClient,
    TeacherTimedOut,
    TeacherUnreachable,
    _Replicas,
    _StreamReader,
    as_request,
)
from shared.errors import (
    FingerprintMismatch,
    InvalidRequest,
    NotFound,
    NotReady,
    QueueFull,
    ServerError,
    TeacherError,
)
from shared.protocol import (
    MSGPACK,
    ScoreResult,
    SequenceScore,
    StreamItem,
    Usage,
    encode_response,
    encode_stream_done,
    encode_stream_score,
    pack_frame,
)
from tests.conftest import (
    TEACHER_REQUESTS,
    a_closed_port,
    canned,
    free_port,
    metric,
    plain_http,
    round_robin_balancer,
    serve,
    silent_host,
    static_files,
    teacher_with_another_tokenizer,
    wait_for,
)
from tests.teacher.test_routes import GatedBackend, SlowLoadBackend

SEQ = ([1, 21, 18, 5], [6, 14, 7])


def test_connect_accepts_the_same_tokenizer(teacher_url, teacher):
    with TeacherClient(teacher_url) as client:
        [info] = client.connect(teacher[1])
    assert info["backend"] == "hf"


def test_connect_refuses_another_tokenizer(teacher_url):
    with TeacherClient(teacher_url) as client, pytest.raises(FingerprintMismatch) as info:
        client.connect("sha256:someone-elses-tokenizer")
    assert teacher_url in str(info.value) and "another tokenizer" in str(info.value)


def test_a_stream_from_a_replica_with_another_tokenizer_is_refused(teacher_url, teacher, tmp_path):
    """Behind a balancer connect() meets one replica; a stream, on a connection of its own, may
    reach another: its answer is refused, not scored."""
    other = create_app(TeacherSettings(model=str(teacher_with_another_tokenizer(tmp_path / "t"))))
    with serve(other) as other_url, round_robin_balancer([teacher_url, other_url]) as pool:
        with TeacherClient(pool) as client:
            client.connect(teacher[1])  # the balancer's first connection: the bundled teacher
            with pytest.raises(FingerprintMismatch, match="another tokenizer") as info:
                list(client.score_stream([{"sequences": [SEQ]}]))  # its second: the other
    assert pool in str(info.value)


def test_a_score_from_a_replica_that_changed_behind_the_url_is_refused(teacher, tmp_path):
    """The replica connect() met is replaced by one with another tokenizer: the next /score, on
    a new connection, reaches it, and its answer is refused."""
    first = create_app(TeacherSettings(model=str(TEACHER_PATH)))
    other = create_app(TeacherSettings(model=str(teacher_with_another_tokenizer(tmp_path / "t"))))
    with serve(other) as other_url, contextlib.ExitStack() as replaced:
        first_url = replaced.enter_context(serve(first))
        with round_robin_balancer([first_url, other_url]) as pool, TeacherClient(pool) as client:
            client.connect(teacher[1])
            assert len(client.score([SEQ]).results) == 1  # on connect()'s connection: the first
            replaced.close()  # the first replica stops, and its connections end
            with pytest.raises(FingerprintMismatch, match="another tokenizer") as info:
                client.score([SEQ])
    assert pool in str(info.value)


@pytest.mark.parametrize("page", [None, "info"])
def test_a_server_that_is_not_a_teacher_is_named_without_its_page(tmp_path, page):
    if page:  # GET /info answers 200, but not with a teacher's JSON
        (tmp_path / page).write_text("<html>hello</html>")
    with static_files(tmp_path) as url:
        with TeacherClient(url, max_retries=0) as client:
            for call in (client.connect, client.info):
                with pytest.raises(TeacherError, match=f"{url} is not an OPD teacher") as info:
                    call()
                assert "<html" not in str(info.value).lower()

        async def connect_async():
            async with AsyncTeacherClient(url, max_retries=0) as client:
                await client.connect()

        with pytest.raises(TeacherError, match="is not an OPD teacher"):
            asyncio.run(connect_async())


def test_an_info_without_the_limits_a_trainer_checks_is_named_not_a_teacher():
    body = b'{"tokenizer_fingerprint": "sha256:0", "max_top_k": 20}'
    with plain_http(canned(200, body, "application/json")) as url:
        with TeacherClient(url, max_retries=0) as client:
            with pytest.raises(TeacherError, match="its /info gives no max_seq_len, vocab_size$"):
                client.info()


def test_a_plain_text_error_from_a_proxy_is_kept_in_one_line():
    with plain_http(canned(502, b"upstream connect error\n")) as url:
        with TeacherClient(url, max_retries=0) as client, pytest.raises(TeacherError) as info:
            client.score([SEQ])
    assert str(info.value) == f"HTTP 502 from POST {url}/score: upstream connect error"


@pytest.mark.parametrize("binary", [True, False])
def test_a_200_that_is_no_score_result_says_so(binary):
    not_a_score = canned(200, b'{"results": "nope"}', "application/json")
    with plain_http(not_a_score) as url, TeacherClient(url, binary=binary) as client:
        with pytest.raises(TeacherError, match="the answer is not a teacher's score result"):
            client.score([SEQ])


def score_answer(*scores: SequenceScore, binary: bool) -> bytes:
    """A teacher's /score answer holding `scores`, as the server encodes one."""
    usage = Usage(prompt_tokens=0, scored_tokens=sum(len(s.logprobs) for s in scores))
    result = ScoreResult(
        model="m", tokenizer_fingerprint="sha256:0", results=list(scores), usage=usage
    )
    return encode_response(result, binary)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize(
    "score, top_k, says",
    [
        (SequenceScore(logprobs=np.zeros(2, np.float32)), 0, "2 log-probs for its 3 scored"),
        (
            SequenceScore(
                logprobs=np.zeros(3, np.float32),
                topk_ids=np.zeros((3, 2), np.int32),
                topk_logprobs=np.zeros((3, 2), np.float32),
            ),
            3,
            r"top-k ids of shape \(3, 2\), not \(3, 3\)",
        ),
    ],
    ids=["a-position-short", "a-narrower-top-k"],
)
def test_an_answer_of_another_shape_than_asked_is_refused_not_trained_on(
    binary, score, top_k, says
):
    """A buggy teacher (or one behind a proxy that mixed answers up) off by a position would
    train the student on scores of other tokens; it was checked only for its count."""
    ctype = MSGPACK if binary else "application/json"
    with plain_http(canned(200, score_answer(score, binary=binary), ctype)) as url:
        with TeacherClient(url, binary=binary) as client:
            with pytest.raises(TeacherError, match=f"answered sequence 0 with {says}"):
                client.score([SEQ], top_k=top_k)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "tokenizer_fingerprint": "f", "usage": {"prompt_tokens": 0, '
        b'"scored_tokens": 1}, "results": [{"logprobs": [0], "topk_ids": [[1099511627776]], '
        b'"topk_logprobs": [[0]]}]}',  # an id past int32: OverflowError, not a TeacherError
        b'{"model": "m", "tokenizer_fingerprint": "f", "usage": {"prompt_tokens": 0, '
        b'"scored_tokens": 1}, "results": [{"logprobs": [1' + b"0" * 400 + b"]}]}",
    ],
    ids=["id-past-int32", "huge-number"],
)
def test_numbers_past_the_wire_types_are_not_a_teachers_answer(body):
    with plain_http(canned(200, body, "application/json")) as url:
        with TeacherClient(url, binary=False) as client:
            with pytest.raises(TeacherError, match="not a teacher's score result"):
                client.score([SEQ])


def test_an_answer_that_cannot_be_decompressed_is_a_server_error_and_none_is_asked_for():
    """httpx inflates what a server compresses, asked or not: the client asks for none, and an
    answer it cannot inflate is the teacher's fault in the documented error types."""
    seen = {}

    class Gzipped(
        canned(200, b"not gzip at all", "application/json", {"content-encoding": "gzip"})
    ):
        def answer(self) -> None:
            seen["accept-encoding"] = self.headers.get("accept-encoding")
            super().answer()

        do_GET = do_POST = answer  # noqa: N815

    with plain_http(Gzipped) as url, TeacherClient(url, max_retries=0) as client:
        with pytest.raises(ServerError, match=f"teacher at {url} sent an answer that cannot be"):
            client.health()
    assert seen["accept-encoding"] == "identity"

    async def health_async():
        async with AsyncTeacherClient(url, max_retries=0) as client:
            await client.health()

    with plain_http(Gzipped) as url, pytest.raises(ServerError, match="cannot be decoded"):
        asyncio.run(health_async())


def test_a_health_check_answered_by_another_server_is_a_teacher_error():
    with plain_http(canned(200, b"<html>hello</html>", "text/html")) as url:
        with TeacherClient(url, max_retries=0) as client:
            for call in (client.health, client.ready):
                with pytest.raises(TeacherError, match="did not answer JSON: not an OPD teacher"):
                    call()


@pytest.mark.parametrize("retries", [None, -1, 1.5, True])
def test_max_retries_must_be_a_count(retries):
    with pytest.raises(ValueError, match="max_retries must be an integer >= 0"):
        TeacherClient("http://127.0.0.1:1", max_retries=retries)


def test_a_server_error_names_the_replica_that_answered_it():
    """With several replicas, a step that fails on a 500 must say which one to look at."""
    body = (
        b'{"error": {"message": "CUDA error", "type": "server_error", "param": null, "code": 500}}'
    )
    with plain_http(canned(500, body, "application/json")) as url:
        with TeacherClient(url, max_retries=0) as client, pytest.raises(ServerError) as err:
            client.score([SEQ])
    assert str(err.value) == f"teacher at {url}: CUDA error"


def test_a_429_whose_retries_ran_out_leaves_the_replica_sitting_out():
    body = b'{"error": {"message": "queue full", "type": "queue_full", "param": null, "code": 429}}'
    with plain_http(canned(429, body, "application/json")) as url:
        with TeacherClient(url, max_retries=0) as client:
            with pytest.raises(QueueFull):
                client.score([SEQ])
            assert not client.is_up(url)  # the refusal does not forgive what it said


def test_the_backoff_stays_finite_and_capped_however_many_tries():
    with TeacherClient("http://127.0.0.1:1", backoff=0.5, max_backoff=30) as client:
        waits = [client._core._backoff(attempt) for attempt in (0, 10, 1100, 10**6)]
    assert 0.25 <= waits[0] <= 0.5 and all(15 <= w <= 30 for w in waits[1:])


def test_a_retry_after_that_is_no_wait_falls_back_to_the_clients_backoff():
    values = iter(["nan", "-1", "inf", "Wed, 21 Oct 2026 07:28:00 GMT"])

    class OddRetryAfter(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the name http.server calls)
            self.send_response(503)
            self.send_header("retry-after", next(values, "0"))
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    with plain_http(OddRetryAfter) as url:
        with TeacherClient(url, max_retries=4, backoff=0.01) as client:
            with pytest.raises(NotReady):  # retried each time (not a ValueError), then given up
                client.score([SEQ])
    assert next(values, None) is None  # all four were answered and retried


def test_server_errors_are_raised_with_their_type(teacher_url):
    with TeacherClient(teacher_url) as client, pytest.raises(InvalidRequest) as info:
        client.score([SEQ], top_k=10_000)
    assert info.value.param == "top_k"


def test_unreachable_teacher_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with TeacherClient(url, max_retries=1, backoff=0.01) as client:
        with pytest.raises(TeacherUnreachable, match=url):
            client.score([SEQ])


def test_a_host_that_never_answers_costs_the_connect_timeout_not_the_request_timeout():
    with silent_host() as url:
        with TeacherClient(url, max_retries=1, backoff=0.01, connect_timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(
                TeacherUnreachable, match=r"unreachable after 3 attempts \(ConnectTimeout"
            ):
                client.connect()
            with pytest.raises(TeacherUnreachable, match=f"teacher at {url} is unreachable"):
                list(client.score_stream([{"sequences": [SEQ]}]))
        assert time.monotonic() - started < 10  # three tries of 0.3 s, not of 120 s


def test_dead_replica_fails_over_to_a_live_one(teacher_url):
    dead = f"http://127.0.0.1:{free_port()}"
    with TeacherClient([dead, teacher_url], backoff=0.01) as client:
        for _ in range(4):
            assert len(client.score([SEQ]).results[0].logprobs) == 3


def test_503_while_loading_is_retried_until_ready():
    backend = SlowLoadBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app, ready_path="/health") as url:
        threading.Timer(1.0, backend.release.set).start()
        with TeacherClient(url, backoff=0.05) as client:
            assert len(client.score([SEQ]).results[0].logprobs) == 3


def test_connect_to_a_teacher_whose_model_failed_to_load_says_why_at_once(tmp_path):
    app = create_app(TeacherSettings(model=str(tmp_path)))
    with serve(app, ready_path="/health") as url:
        with TeacherClient(url) as client, pytest.raises(ServerError, match="failed to load"):
            client.connect(wait_s=30)  # a wait would end in NotReady after 30 s
        with TeacherClient(url) as client, pytest.raises(ServerError, match=f"teacher at {url}: "):
            client.connect()


def test_429_is_retried_after_retry_after():
    backend = GatedBackend(str(TEACHER_PATH), max_queue_tokens=20)
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app) as url:
        body = {"sequences": [{"prompt_ids": [1] * 10, "completion_ids": [5] * 5}]}
        held = [
            threading.Thread(target=httpx.post, args=(url + "/score",), kwargs={"json": body})
            for _ in range(2)
        ]
        for t in held:
            t.start()
        backend.running.wait(10)
        wait_for(lambda: backend.queue_depth() == 1)  # one scoring, one queued: the queue is full
        threading.Timer(1.5, backend.gate.set).start()
        with TeacherClient(url) as client:  # queue full at first: 429, Retry-After, then success
            assert len(client.score([([1] * 5, [5] * 5)]).results[0].logprobs) == 5
        for t in held:
            t.join()
        text = httpx.get(url + "/metrics").text
        assert 'route="/score",status="429"' in text


def test_a_read_timeout_is_not_sent_again_to_a_busy_replica():
    backend = GatedBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app) as url:
        try:
            with TeacherClient(url, timeout=0.5) as client:
                with pytest.raises(TeacherTimedOut, match="did not answer within 0.5 s"):
                    client.score([SEQ])
                assert client.is_up(url)  # slow is not down
        finally:
            backend.gate.set()
        # The client hung up, so the teacher ended the request as a 499.
        wait_for(lambda: metric(url, TEACHER_REQUESTS, route="/score", status="499") == 1)
        time.sleep(0.3)  # a second copy, had one been sent, was queued behind the first
        assert metric(url, TEACHER_REQUESTS, route="/score") == 1  # sent once


def test_retries_to_a_pinned_replica_back_off_even_when_another_is_up(teacher_url):
    down = f"http://127.0.0.1:{free_port()}"
    with TeacherClient([down, teacher_url], max_retries=2, backoff=0.2) as client:
        started = time.monotonic()
        with pytest.raises(TeacherUnreachable):
            client.health(down)
        assert time.monotonic() - started >= 0.3  # 0.1-0.2 s, then 0.2-0.4 s


def test_requests_spread_over_replicas_by_least_in_flight(teacher_url):
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)))
    with serve(app) as second:

        async def run():
            async with AsyncTeacherClient([teacher_url, second]) as client:
                return await asyncio.gather(*(client.score([SEQ]) for _ in range(10)))

        def served(url):
            return metric(url, TEACHER_REQUESTS, route="/score", status="200")

        before = served(teacher_url), served(second)
        assert len(asyncio.run(run())) == 10
        after = served(teacher_url), served(second)
    assert (after[0] - before[0], after[1] - before[1]) == (5, 5)


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:8000",
        "htp://127.0.0.1:8000",
        "http://",
        "http://[::1",
        "http://h:99999",
        "http://h:0",
    ],
)
def test_a_url_that_is_no_teacher_address_is_refused_at_once(url):
    with pytest.raises(ValueError, match="teacher URL"):
        TeacherClient(url)


@pytest.mark.parametrize(
    "call, param",
    [
        (dict(sequences=[]), "sequences"),
        (dict(sequences=[([1, 2], [-1])]), "sequences.0.completion_ids.0"),
        (dict(sequences=[SEQ], top_k=-1), "top_k"),
        (dict(sequences=[SEQ], max_positions=0), "max_positions"),
        (dict(sequences=SEQ), "sequences.0"),  # one pair, not a list of them
    ],
)
def test_bad_arguments_are_refused_before_sending_naming_the_field(call, param):
    # No server: the client refuses these itself, in the error the server would answer.
    with TeacherClient(f"http://127.0.0.1:{free_port()}", max_retries=0) as client:
        with pytest.raises(InvalidRequest) as error:
            client.score(**call)
    assert error.value.param == param


def test_health_and_ready_answer_per_replica_and_connect_takes_no_path(teacher_url):
    with TeacherClient(teacher_url) as client:
        assert (
            client.health() == {"status": "ok"} and client.ready(teacher_url)["status"] == "ready"
        )
        with pytest.raises(ValueError, match="takes a tokenizer or its fingerprint"):
            client.connect("models/tiny-student")

    async def probe():
        async with AsyncTeacherClient(teacher_url) as client:
            return await client.health(teacher_url), await client.ready()

    assert asyncio.run(probe()) == ({"status": "ok"}, {"status": "ready"})


def test_sequences_may_be_any_iterable_of_pairs(teacher_url):
    with TeacherClient(teacher_url) as client:
        from_generator = client.score(tuple(s) for s in [SEQ, SEQ])
        assert [len(r.logprobs) for r in from_generator.results] == [3, 3]


def test_a_url_with_a_path_after_the_teachers_address_is_named_on_404(teacher_url):
    with TeacherClient(teacher_url + "/api") as client:
        with pytest.raises(NotFound, match=r"POST .*/api/score \(is the URL the teacher's base"):
            client.score([SEQ])


def test_a_closed_client_refuses_streams_as_it_refuses_requests(teacher_url):
    client = TeacherClient(teacher_url)
    client.close()
    for call in (lambda: client.score([SEQ]), lambda: list(client.score_stream([]))):
        with pytest.raises(RuntimeError, match="client has been closed"):
            call()


def test_a_replica_that_keeps_failing_sits_out_longer_each_time_until_it_answers():
    """Each failure in a row doubles its sit-out (up to a minute), so a replica that stays dead does
    not get a share of every step's work again; one answer brings it back to the first span."""
    replicas = _Replicas(["http://a:1", "http://b:1"])

    def sits_out() -> float:
        return replicas.down_until["http://a:1"] - time.monotonic()

    spans = []
    for _ in range(7):
        replicas.down_until["http://a:1"] = 0.0  # its sit-out is over; it is tried and fails
        replicas.mark_down("http://a:1", 2.0)
        spans.append(sits_out())
    assert [round(s) for s in spans] == [2, 4, 8, 16, 32, 60, 60]
    assert not replicas.is_up("http://a:1") and replicas.acquire() == "http://b:1"
    replicas.down_until["http://a:1"] = 0.0
    replicas.mark_good("http://a:1")
    replicas.mark_down("http://a:1", 2.0)
    assert round(sits_out()) == 2


def test_a_late_answer_does_not_forgive_a_failure_reported_since_it_was_asked():
    """A stream given up on as too slow (the trainer's stall rescue) whose first score comes
    after: forgiving that failure too would give an always-slow replica every step's frames
    again, each then scored twice."""
    replicas = _Replicas(["http://a:1", "http://b:1"])
    asked_at = time.monotonic()
    replicas.mark_down("http://a:1", 2.0)  # given up on, after the stream was opened
    replicas.mark_good("http://a:1", asked_at)  # its late first score
    assert not replicas.is_up("http://a:1") and replicas.failures["http://a:1"] == 1
    replicas.mark_good("http://a:1", time.monotonic())  # an answer to what was asked since
    assert replicas.is_up("http://a:1") and replicas.failures["http://a:1"] == 0


def test_failures_reported_while_a_replica_sits_out_are_one_incident():
    """The other requests a dying replica held, or a second report of one broken stream, must not
    each double its sit-out: one death is one failure."""
    replicas = _Replicas(["http://a:1", "http://b:1"])
    for _ in range(8):
        replicas.mark_down("http://a:1", 2.0)
    assert replicas.failures["http://a:1"] == 1
    assert round(replicas.down_until["http://a:1"] - time.monotonic()) == 2


def test_a_replica_still_loading_is_passed_over_for_one_that_is_up(teacher_url):
    """A 503 (or 429) sits the replica out for its Retry-After, so the retry and the requests
    after it go to the replica that is up, at once, instead of waiting on the loading one."""
    backend = SlowLoadBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app, ready_path="/health") as loading:
        try:
            with TeacherClient([loading, teacher_url]) as client:
                for _ in range(4):
                    assert len(client.score([SEQ]).results[0].logprobs) == 3
                assert not client.is_up(loading)
            assert (
                metric(loading, TEACHER_REQUESTS, route="/score", status="503") <= 1
            )  # asked once, then passed over
        finally:
            backend.release.set()


def test_a_pinned_url_with_a_slash_or_outside_the_pool_is_asked_as_any_other(teacher_url):
    with TeacherClient([teacher_url], max_retries=0) as client:
        assert client.health(url=teacher_url + "/") == {"status": "ok"}
        elsewhere = f"http://127.0.0.1:{a_closed_port()}"
        with pytest.raises(TeacherUnreachable):
            client.health(url=elsewhere)
        assert client.is_up(elsewhere) and client.is_up(teacher_url)


@pytest.mark.parametrize("key", ["s3cret\n", "two words", "s3cr\u00e9t"])
def test_an_api_key_no_header_can_carry_is_refused_at_once(key):
    with pytest.raises(ValueError, match="only visible ASCII"):
        TeacherClient("http://127.0.0.1:1", api_key=key)


def binary_answer(results: list[dict]) -> bytes:
    return msgpack.packb(
        {
            "model": "m",
            "tokenizer_fingerprint": "sha256:0",
            "results": results,
            "usage": {"prompt_tokens": 4, "scored_tokens": 3},
        },
        use_bin_type=True,
    )


def f32(*values: float) -> bytes:
    return np.asarray(values, "<f4").tobytes()


SCORE_OF_3 = {
    "logprobs": f32(-1, -2, -3),
    "top_k": 0,
    "topk_ids": None,
    "topk_logprobs": None,
    "candidate_logprobs": None,
}


@pytest.mark.parametrize(
    "results, says",
    [
        ([], "answered 0 of the 1 sequences"),
        ([SCORE_OF_3, SCORE_OF_3], "answered 2 of the 1 sequences"),
        (  # top-2 rows for 4 positions, not the 3 scored
            [
                {
                    **SCORE_OF_3,
                    "top_k": 2,
                    "topk_ids": np.zeros(8, "<i4").tobytes(),
                    "topk_logprobs": f32(*[0.0] * 8),
                }
            ],
            "not a teacher's score result",
        ),
    ],
)
def test_a_binary_answer_that_does_not_fit_the_request_is_an_error(results, says):
    answer = canned(200, binary_answer(results), MSGPACK)
    with plain_http(answer) as url, TeacherClient(url, max_retries=0) as client:
        with pytest.raises(TeacherError, match=says):
            client.score([SEQ], top_k=2)


def test_a_stream_answer_that_is_no_stream_is_the_teachers_error_not_the_callers():
    reader = _StreamReader("http://t:1", lambda: None)
    with pytest.raises(TeacherError, match="not a teacher's stream frame"):
        reader.feed(pack_frame({"done": True, "frames": "1", "sequences": 0}))
    broken = _StreamReader("http://t:1", lambda: None)
    with pytest.raises(ServerError, match="the stream from http://t:1 is broken"):
        broken.feed(struct.pack("<I", 2**32 - 1))  # a frame longer than any teacher sends


TWO = {"sequences": [([1, 21], [5, 6, 7]), ([1, 22], [5, 6, 7])], "top_k": 2, "max_positions": 8}
NARROW = SequenceScore(np.zeros(3, np.float32), np.zeros((3, 1), np.int32), np.zeros((3, 1)))


@pytest.mark.parametrize(
    "frame, index, score, says",
    [
        (1, 0, None, "answered frame 1, not open"),
        (-1, 0, None, "answered frame -1, not open"),  # would wrap around to the last one
        (0, 2, None, "answered sequence 2 of frame 0, which has 2"),
        (0, -1, None, "answered sequence -1 of frame 0, which has 2"),
        (0, 1, SequenceScore(np.zeros(2, np.float32)), "answered sequence 1 of frame 0 with 2"),
        (
            0,
            1,
            SequenceScore(np.zeros(3, np.float32)),
            "answered sequence 1 of frame 0 with top-k ids of shape None",
        ),
        (0, 1, NARROW, "answered sequence 1 of frame 0 with top-k ids of shape (3, 1)"),
    ],
)
def test_a_streamed_answer_is_held_to_the_frame_and_shape_asked_for(frame, index, score, says):
    """As /score's answers are: a score on a rollout never sent, or of the wrong shape, would be
    trained on (a narrower top-k broke the trainer's loss with a bare shape error)."""
    reader = _StreamReader("http://replica", lambda: None)
    reader.frame(as_request(TWO))
    with pytest.raises(ServerError, match=re.escape(f"teacher at http://replica {says}")):
        reader._check(StreamItem(frame, index, score))
    right = SequenceScore(np.zeros(3, np.float32), np.zeros((3, 2), np.int32), np.zeros((3, 2)))
    reader._check(StreamItem(0, 0, right))
    reader._check(StreamItem(0, 1, right))
    with pytest.raises(ServerError, match="answered frame 0, not open"):  # wholly answered
        reader._check(StreamItem(0, 0, right))


def test_a_stream_that_ends_with_a_sequence_unanswered_is_the_teachers_error():
    """A frame the teacher read but did not wholly answer (a failure of its own that answered
    nothing) left its rollout unscored without a word."""
    reader = _StreamReader("http://replica", lambda: None)
    reader.frame(as_request(TWO))
    right = SequenceScore(np.zeros(3, np.float32), np.zeros((3, 2), np.int32), np.zeros((3, 2)))
    reader.feed(encode_stream_score(0, 0, right, 0.0) + encode_stream_done(1, 1))
    with pytest.raises(ServerError, match=r"ended its stream with frames \[0\] not wholly"):
        reader.finish()


def test_a_stream_that_breaks_after_it_connected_does_not_sit_its_replica_out():
    """Behind a balancer one broken stream is one replica of several: the client sat the whole
    URL out (2 s, doubling), against the README; only one it never reached sits out."""

    class DiesMidStream(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            self.connection.close()

    request = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [3]}]}
    closed = f"http://127.0.0.1:{a_closed_port()}"
    with plain_http(DiesMidStream) as url, TeacherClient([url, closed]) as client:
        with pytest.raises(ServerError, match="broke|ended without its done frame"):
            list(client.score_stream([request], url=url))
        assert client.is_up(url)
        with pytest.raises(TeacherUnreachable):
            list(client.score_stream([request], url=closed))
        assert not client.is_up(closed)
