"""The teacher's HTTP surface: every bad input is a clear 4xx naming the problem, and the server keeps
serving; health, readiness, info, metrics and docs."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack
import pytest

from opd.bundled import TEACHER_PATH
from services.teacher import routes
from services.teacher.app import MetricsMiddleware, create_app
from services.teacher.backends.hf import HFBackend
from services.teacher.metrics import TeacherMetrics
from services.teacher.routes_openai import CompletionRequest
from services.teacher.routes_trl import SequenceLogprobsRequest
from services.teacher.settings import TeacherSettings
from shared.client import TeacherClient
from shared.errors import Unauthorized
from tests.conftest import TEACHER_REQUESTS, metric, schema_keys, serve, wait_for

GOOD = {"sequences": [{"prompt_ids": [1, 21, 18, 5], "completion_ids": [6, 14, 7]}]}


def post(url: str, body, headers=None, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(url + "/score", content=body, headers=headers or {}, timeout=30, **kw)
    return httpx.post(url + "/score", json=body, headers=headers or {}, timeout=30, **kw)


def assert_error(response: httpx.Response, status: int, param: str | None = None, says: str = ""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    if param is not None:
        assert error["param"] == param
    assert says.lower() in error["message"].lower()


def seq(prompt, completion):
    return {"sequences": [{"prompt_ids": prompt, "completion_ids": completion}]}


@pytest.mark.parametrize(
    "body, param, says",
    [
        ({"sequences": []}, "sequences", "at least 1"),
        (seq([1, 2], []), "sequences.0.completion_ids", "at least 1"),
        (seq([], [5]), "sequences.0.prompt_ids", "at least 1"),
        (seq([1, -3], [5]), "sequences.0.prompt_ids.1", "greater than or equal to 0"),
        (seq([1, 2], [5, 23]), "sequences.0.completion_ids", "token id 23 is out of range"),
        (seq([1, 23], [5]), "sequences.0.prompt_ids", "token id 23 is out of range"),
        (seq([1, True], [5]), "sequences.0.prompt_ids", "not booleans"),
        (seq([1, "21"], [5]), "sequences.0.prompt_ids", "strings"),
        (seq([1], [5.0]), "sequences.0.completion_ids", "floats"),
        ({**GOOD, "top_k": True}, "top_k", "must be an integer, not bool"),
        ({**GOOD, "max_positions": 2.0}, "max_positions", "must be an integer, not float"),
        (seq([1] * 300, [5] * 300), "sequences.0", "max_seq_len"),
        ({**GOOD, "top_k": 21}, "top_k", "max_top_k 20"),
        ({**GOOD, "top_k": -1}, "top_k", "greater than or equal to 0"),
        ({**GOOD, "temperature": 0}, "temperature", "greater than or equal to 0.01"),
        # Would overflow float32 (a 500 that failed every request batched with it) or give NaN.
        ({**GOOD, "temperature": 1e-40}, "temperature", "greater than or equal to 0.01"),
        ({**GOOD, "temperature": 1e39}, "temperature", "less than or equal to 10000"),
        ({**GOOD, "temperature": "0.5"}, "temperature", "must be a number, not str"),
        ({**GOOD, "candidate_ids": [[[1], [2]]]}, "candidate_ids.0", "2 positions"),
        ({**GOOD, "candidate_ids": [[[1]] * 3, [[1]] * 3]}, "candidate_ids", "2 entries"),
        ({**GOOD, "candidate_ids": [[[1], [2], [99]]]}, "candidate_ids.0.2", "out of range"),
        # Each row would widen the whole batch's candidate matrix (150,000 ids took 1 GB).
        ({**GOOD, "candidate_ids": [[[1], [3] * 21, [2]]]}, "candidate_ids.0.1", "max_top_k is 20"),
        ({**GOOD, "max_positions": 0}, "max_positions", "greater than or equal to 1"),
        ({**GOOD, "surprise": 1}, "surprise", "extra"),
        # 400,000 positions x 21 log-probs: a 25 MiB answer, GBs as Python objects while built.
        (
            {"sequences": [{"prompt_ids": [1], "completion_ids": [1] * 200}] * 2000, "top_k": 20},
            "sequences",
            "asks for 8,400,000 log-probs; a response holds at most 8,388,608",
        ),
    ],
)
def test_bad_request_is_422_naming_the_field(teacher_url, body, param, says):
    assert_error(post(teacher_url, body), 422, param, says)
    assert post(teacher_url, GOOD).status_code == 200  # still serving


DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE_INT = b'{"top_k": ' + b"9" * 5000 + b"}"  # more digits than Python converts to int


def test_malformed_bodies_are_400(teacher_url):
    for body in (b"{not json", DEEP, HUGE_INT):
        assert_error(
            post(teacher_url, body, {"Content-Type": "application/json"}),
            400,
            says="not valid JSON",
        )
    assert_error(
        post(teacher_url, b"\xc1\xc1", {"Content-Type": "application/msgpack"}),
        400,
        says="not valid msgpack",
    )
    packed = msgpack.packb({"sequences": [{"prompt_ids": b"\x01\x00\x00", "completion_ids": b""}]})
    assert_error(
        post(teacher_url, packed, {"Content-Type": "application/msgpack"}),
        400,
        "sequences.0.prompt_ids",
        "multiple of 4",
    )
    assert post(teacher_url, GOOD).status_code == 200


@pytest.mark.parametrize("body", [[GOOD], 5, None])
def test_a_body_that_is_no_object_is_400_not_a_field_error(teacher_url, body):
    as_json = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    assert_error(post(teacher_url, as_json, headers), 400, says="body must be a JSON object")
    packed = msgpack.packb(body)
    assert_error(
        post(teacher_url, packed, {"Content-Type": "application/msgpack"}),
        400,
        says="body must be a msgpack map",
    )


def test_unsupported_content_type_is_415(teacher_url):
    assert_error(post(teacher_url, b"x", {"Content-Type": "text/plain"}), 415, "Content-Type")


def test_binary_request_gets_binary_answer(teacher_url):
    from shared.protocol import ScoreRequest, decode_response, encode_request

    body = encode_request(ScoreRequest.model_validate(GOOD), binary=True)
    r = post(teacher_url, body, {"Content-Type": "application/msgpack"})
    assert r.headers["content-type"] == "application/msgpack"
    assert len(decode_response(r.content, binary=True).results[0].logprobs) == 3
    r = post(
        teacher_url, body, {"Content-Type": "application/msgpack", "Accept": "application/json"}
    )
    assert r.json()["results"][0]["logprobs"]


@pytest.mark.parametrize(
    "binary, accept, answer_binary",
    [
        (False, "", False),  # no Accept: the request's own form
        (True, "", True),
        (True, "*/*;q=0.8", True),  # no preference, whatever the q
        (True, "application/*", True),
        (False, "application/msgpack", True),
        (False, "application/json, application/msgpack;q=0", False),  # msgpack marked unacceptable
        (False, "application/msgpack;q=0.5, application/json;q=0.9", False),
        (True, "text/html, application/json;q=0.1", False),  # only JSON is acceptable at all
        (False, "application/x-msgpack;q=0.9, */*;q=0.1", True),
        (True, "application/msgpack;q=0, */*", False),  # named, it outranks the wildcard
        (True, "application/msgpack;q=0", False),  # nothing acceptable: JSON, readably
    ],
)
def test_the_answers_form_follows_accept_q_values(teacher_url, binary, accept, answer_binary):
    from shared.protocol import ScoreRequest, encode_request

    body = encode_request(ScoreRequest.model_validate(GOOD), binary=binary)
    headers = {"Content-Type": "application/msgpack" if binary else "application/json"}
    r = post(teacher_url, body, {**headers, **({"Accept": accept} if accept else {})})
    assert r.status_code == 200
    want = "application/msgpack" if answer_binary else "application/json"
    assert r.headers["content-type"] == want


def test_body_over_the_limit_is_413():
    app = create_app(TeacherSettings(model=str(TEACHER_PATH), max_body_mb=0.001))
    with serve(app) as url:
        big = seq([1] * 1000, [5] * 1000)  # about 4 KB
        assert_error(post(url, big), 413, says="exceeds the limit")
        assert post(url, GOOD).status_code == 200


def test_api_key_is_required_when_set():
    app = create_app(TeacherSettings(model=str(TEACHER_PATH), api_key="s3cret"))
    with serve(app) as url:
        assert_error(post(url, GOOD), 401, "Authorization")
        assert_error(post(url, GOOD, {"Authorization": "Bearer wrong"}), 401)
        assert post(url, GOOD, {"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/info").status_code == 401
        assert httpx.get(url + "/v1/models").status_code == 401  # it names the model's path
        assert httpx.get(url + "/health").status_code == 200  # probes stay open
        with TeacherClient(url, api_key="s3cret") as client:
            assert client.info()["backend"] == "hf"
        with TeacherClient(url, api_key="wrong") as client:  # connect says which replica refused
            with pytest.raises(Unauthorized, match=f"teacher at {url}: missing or wrong API key"):
                client.connect()


class GatedBackend(HFBackend):
    """The real hf backend, with a gate in front of each batch: holds work in the queue on cue."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gate = threading.Event()
        self.running = threading.Event()

    def score_batch(self, jobs):
        self.running.set()
        self.gate.wait(timeout=60)
        return super().score_batch(jobs)


class HangingBackend(HFBackend):
    """The real hf backend, hanging (as a wedged GPU or a stuck replica may) once told to."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.hang, self.hanging, self.release = (threading.Event() for _ in range(3))

    def score_batch(self, jobs):
        if self.hang.is_set():
            self.hanging.set()
            self.release.wait(60)
        return super().score_batch(jobs)


class CountingGatedBackend(GatedBackend):
    sequences = 0

    def score_batch(self, jobs):
        out = super().score_batch(jobs)
        self.sequences += len(jobs)
        return out


def test_queue_full_is_429_with_retry_after_and_recovers():
    backend = GatedBackend(str(TEACHER_PATH), max_queue_tokens=20)
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app) as url:
        first = threading.Thread(target=post, args=(url, seq([1] * 10, [5] * 5)))
        first.start()
        wait_for(backend.running.is_set)  # the first batch holds the worker
        second = threading.Thread(target=post, args=(url, seq([1] * 10, [5] * 5)))
        second.start()
        wait_for(lambda: backend.queue_depth() == 1)  # 15 tokens queued
        r = post(url, seq([1] * 5, [5] * 5))  # 15 + 10 > 20
        assert_error(r, 429, says="queue full")
        assert float(r.headers["retry-after"]) >= 1
        backend.gate.set()
        first.join()
        second.join()
        assert post(url, GOOD).status_code == 200


def test_client_that_disconnects_does_not_wedge_the_batcher():
    backend = GatedBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/score", json=GOOD, timeout=0.3)
        backend.gate.set()
        for _ in range(3):
            assert post(url, GOOD).status_code == 200


class SlowLoadBackend(HFBackend):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.release = threading.Event()

    def load(self):
        self.release.wait(timeout=60)
        return super().load()


def test_a_wrong_key_is_told_at_once_not_after_the_model_loads():
    """A client waits through 503s while a model loads: a bad key must not wait with it."""
    backend = SlowLoadBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH), api_key="s3cret"), backend=backend)
    with serve(app, ready_path="/health") as url:
        for call in (lambda: post(url, GOOD), lambda: httpx.get(url + "/info")):
            assert_error(call(), 401, "Authorization")
        with TeacherClient(url, api_key="wrong") as client:
            with pytest.raises(Unauthorized):
                client.connect(wait_s=60)
        assert_error(post(url, GOOD, {"Authorization": "Bearer s3cret"}), 503, says="loading")
        backend.release.set()


def test_the_model_list_waits_for_a_model_still_loading_as_trls_client_needs(monkeypatch):
    """TRL's client takes /health's 200 as ready, then asks /v1/models once: it gets the list
    when the model is loaded (vLLM serves nothing before), and a 503 only after MODEL_WAIT_S."""
    backend = SlowLoadBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app, ready_path="/health") as url:
        monkeypatch.setattr("services.teacher.deps.MODEL_WAIT_S", 0.5)
        assert_error(httpx.get(url + "/v1/models"), 503, says="loading")
        monkeypatch.setattr("services.teacher.deps.MODEL_WAIT_S", 60)
        threading.Timer(1.0, backend.release.set).start()
        started = time.monotonic()
        models = httpx.get(url + "/v1/models", timeout=60)
        assert models.status_code == 200 and time.monotonic() - started >= 0.5
        assert models.json()["data"][0]["root"] == str(TEACHER_PATH)


def test_ready_is_503_until_the_model_is_loaded():
    backend = SlowLoadBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app, ready_path="/health") as url:
        assert httpx.get(url + "/health").status_code == 200
        assert_error(httpx.get(url + "/ready"), 503, says="loading")
        assert_error(httpx.get(url + "/health/"), 503, says="loading")  # TRL's readiness probe
        assert_error(post(url, GOOD), 503)
        backend.release.set()
        wait_for(lambda: httpx.get(url + "/ready").status_code == 200)
        assert post(url, GOOD).status_code == 200
        assert httpx.get(url + "/health/").status_code == 200


def test_a_model_that_fails_to_load_says_why_with_a_500_that_clients_do_not_retry(tmp_path):
    app = create_app(TeacherSettings(model=str(tmp_path)))
    with serve(app, ready_path="/health") as url:
        wait_for(lambda: "failed" in httpx.get(url + "/ready").text)
        assert_error(httpx.get(url + "/ready"), 500, says="config.json")
        assert_error(post(url, GOOD), 500, says="failed to load")


def test_info_names_model_backend_and_limits(teacher_url, teacher):
    from shared.fingerprint import tokenizer_fingerprint

    info = httpx.get(teacher_url + "/info").json()
    assert info["backend"] == "hf"
    assert info["dtype"] == "float32"
    assert info["vocab_size"] == 23
    assert info["max_top_k"] == 20
    assert info["max_seq_len"] == 512
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(teacher[1])
    assert info["version"] == importlib.metadata.version("opd-teacher-service")


def test_metrics_count_requests_tokens_and_batches(teacher_url):
    # Read before and after: the teacher is the module's, other tests' requests are counted too.
    counted = {
        "ok": lambda: metric(teacher_url, TEACHER_REQUESTS, route="/score", status="200"),
        "refused": lambda: metric(teacher_url, TEACHER_REQUESTS, route="/score", status="422"),
        "tokens": lambda: metric(teacher_url, "opd_teacher_tokens_scored_total"),
        "batches": lambda: metric(teacher_url, "opd_teacher_batch_sequences_count"),
        "timed": lambda: metric(teacher_url, "opd_teacher_request_seconds_count", route="/score"),
    }
    before = {name: read() for name, read in counted.items()}
    post(teacher_url, GOOD)
    post(teacher_url, {"sequences": []})

    def grew() -> dict[str, float]:
        return {name: read() - before[name] for name, read in counted.items()}

    wait_for(lambda: grew()["timed"] >= 2)  # counted once the answer has gone out
    scored = len(GOOD["sequences"][0]["completion_ids"])
    assert grew() == {"ok": 1, "refused": 1, "tokens": scored, "batches": 1, "timed": 2}
    assert metric(teacher_url, "opd_teacher_queue_depth") == 0  # nothing left waiting


def test_a_request_cut_off_unanswered_is_counted_as_cancelled_not_as_a_500():
    """As uvicorn cancels requests still in flight 10 s into a shutdown: a rolling restart under
    load showed up as server errors."""
    metrics = TeacherMetrics()

    async def cut_off(scope, receive, send):
        raise asyncio.CancelledError

    async def failing(scope, receive, send):
        raise RuntimeError("a bug")

    for app in (cut_off, failing):
        with pytest.raises((asyncio.CancelledError, RuntimeError)):
            asyncio.run(MetricsMiddleware(app, metrics)({"type": "http"}, None, None))
    samples = metrics.requests.collect()[0].samples
    counted = {s.labels["status"]: s.value for s in samples if s.name.endswith("_total")}
    assert counted == {"cancelled": 1.0, "500": 1.0}


def test_openapi_documents_score(teacher_url):
    spec = httpx.get(teacher_url + "/openapi.json").json()
    body = spec["paths"]["/score"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/msgpack"} <= set(body)
    assert body["application/json"]["schema"]["properties"]["sequences"]["items"]["properties"]
    # Every reference in the document leads somewhere in it, so /docs can show every body.
    refs = re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(spec))
    for ref in refs:
        node = spec
        for part in ref.split("/"):
            node = node[part]
    assert refs  # the responses' models are in components/schemas
    assert httpx.get(teacher_url + "/docs").status_code == 200


def test_the_api_documents_every_bound_in_json_schema_keywords(teacher_url):
    schemas = [httpx.get(teacher_url + "/openapi.json").json()]
    schemas += [m.model_json_schema() for m in (CompletionRequest, SequenceLogprobsRequest)]
    assert not schema_keys(schemas) & {"gt", "ge", "lt", "le"}


def test_unknown_route_is_404_in_the_error_shape(teacher_url):
    assert_error(httpx.get(teacher_url + "/nope"), 404)


def test_a_failed_forward_is_a_500_and_the_connection_stays_usable():
    from tests.teacher.test_routes_stream import CrashingBackend

    backend = CrashingBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app) as url, httpx.Client(base_url=url) as http:
        for _ in range(3):
            backend.crashes = 1
            r = http.post("/score", json=GOOD)
            assert_error(r, 500, says="internal error (RuntimeError)")
            # The same keep-alive connection serves the next request: the failure was answered,
            # not re-raised to the server (which logs it as a crash and drops the connection).
            assert http.post("/score", json=GOOD).status_code == 200


def test_a_client_that_goes_away_mid_body_is_a_499_not_a_server_error():
    with serve(create_app(TeacherSettings(model=str(TEACHER_PATH)))) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n" + b'{"sequences": ['
            )
            time.sleep(0.2)
        counted = 'opd_teacher_requests_total{route="/score",status="499"}'
        wait_for(lambda: counted in httpx.get(url + "/metrics").text)
        assert 'route="/score",status="500"' not in httpx.get(url + "/metrics").text


def test_a_client_that_goes_away_before_its_turn_is_not_scored():
    """A /score whose client timed out and hung up leaves the queue: the next requests do not wait
    behind work nobody will read."""
    backend = CountingGatedBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    body = json.dumps(seq([1, 2], [5, 6])).encode()
    with serve(app) as url:
        first = threading.Thread(target=post, args=(url, seq([1, 2], [5, 6])))
        first.start()
        try:
            assert backend.running.wait(timeout=30)  # the first request holds the worker
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
                )
                wait_for(lambda: backend.queue_depth() == 1)  # queued behind the first
            gone = 'route="/score",status="499"'  # its handler saw the client go, cancelled it
            wait_for(lambda: gone in httpx.get(url + "/metrics").text)
        finally:
            backend.gate.set()
        first.join(timeout=30)
        time.sleep(0.3)
        assert backend.sequences == 1


@pytest.mark.parametrize("step", ["decode_request", "encode_response"])
def test_a_body_being_decoded_or_an_answer_encoded_holds_up_no_other_request(
    teacher_url, monkeypatch, step
):
    """Seconds for a large request (8 MiB of JSON took 3 s): on the event loop, every other
    request (health checks, streams) waited meanwhile; here /health timed out."""
    send = lambda: post(teacher_url, GOOD)  # noqa: E731
    answer = held_while_health_answers(monkeypatch, teacher_url, routes, step, send)
    assert answer.status_code == 200


def held_while_health_answers(monkeypatch, url: str, module, name: str, send) -> httpx.Response:
    """`send()`'s answer, with `module.name` held on a gate while the server at `url` must answer
    /health: the held work (decoding a body, building an answer) runs off the event loop."""
    working, release = threading.Event(), threading.Event()
    original = getattr(module, name)

    def held(*args, **kwargs):
        working.set()
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, held)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(send)
        assert working.wait(30)
        try:
            assert httpx.get(url + "/health", timeout=5).status_code == 200
        finally:
            release.set()
        return answer.result()
