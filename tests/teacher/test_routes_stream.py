"""POST /score/stream: frames in, one result frame per sequence out, equal to POST /score."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import msgpack
import numpy as np
import pytest

from opd.bundled import TEACHER_PATH
from services.teacher import routes_stream, scoring
from services.teacher.app import create_app
from services.teacher.backends.hf import HFBackend
from services.teacher.settings import TeacherSettings
from shared.client import AsyncTeacherClient, TeacherClient, TeacherTimedOut, TeacherUnreachable
from shared.errors import InvalidRequest, ServerError, Unauthorized
from shared.protocol import (
    FRAMES,
    FrameReader,
    ScoreRequest,
    SequenceScore,
    decode_stream_item,
    encode_request_frame,
    encode_stream_done,
    encode_stream_score,
    frame_bytes,
    validate_request,
)
from tests.conftest import free_port, metric, plain_http, serve, wait_for
from tests.teacher.test_routes import (
    CountingGatedBackend,
    GatedBackend,
    held_while_health_answers,
)
from tests.teacher.test_scoring import mixed_sequences, reference_logp


def frames_of(seqs, size):
    return [
        {
            "sequences": [{"prompt_ids": p, "completion_ids": c} for p, c in seqs[i : i + size]],
            "top_k": 3,
        }
        for i in range(0, len(seqs), size)
    ]


def test_stream_results_equal_score_results(teacher, teacher_url):
    seqs = mixed_sequences(teacher[1], n=7)
    frames = frames_of(seqs, 3)
    with TeacherClient(teacher_url) as client:
        items = list(client.score_stream(iter(frames)))
        direct = client.score(seqs, top_k=3)
    assert items[-1].done and not any(i.error for i in items)
    assert (items[-1].frames, items[-1].sequences) == (3, 7)  # what the teacher says it answered
    got = {(i.frame * 3 + i.index): i.score for i in items[:-1]}
    assert sorted(got) == list(range(7))  # every sequence exactly once
    for k, want in enumerate(direct.results):
        assert np.allclose(got[k].logprobs, want.logprobs, atol=1e-5)
        assert np.array_equal(got[k].topk_ids, want.topk_ids)
    assert all(i.compute_s > 0 for i in items[:-1])
    got[0].logprobs *= 2  # results are the caller's arrays, writable as from JSON
    direct.results[0].topk_logprobs[0, 0] = 0.0


def test_async_stream_sends_frames_as_they_are_produced(teacher, teacher_url):
    seqs = mixed_sequences(teacher[1], n=4)

    async def produce():
        for frame in frames_of(seqs, 2):
            await asyncio.sleep(0.05)  # frames arrive over time, as rollouts finish
            yield frame

    async def run():
        async with AsyncTeacherClient(teacher_url) as client:
            return [item async for item in client.score_stream(produce())]

    items = asyncio.run(run())
    assert sum(1 for i in items if i.score is not None) == 4 and items[-1].done


def test_results_come_back_while_the_input_is_still_open(teacher, teacher_url):
    """Full duplex: the second frame is only produced once the first one's result is back."""
    first, second = frames_of(mixed_sequences(teacher[1], n=2), 1)
    answered = threading.Event()

    def produce():
        yield first
        assert answered.wait(timeout=10), "no result before the input ended"
        yield second

    with TeacherClient(teacher_url) as client:
        items = []
        for item in client.score_stream(produce()):
            items.append(item)
            answered.set()
    assert [i.frame for i in items if i.score is not None] == [0, 1] and items[-1].done


def test_async_results_come_back_while_the_input_is_still_open(teacher, teacher_url):
    first, second = frames_of(mixed_sequences(teacher[1], n=2), 1)

    async def run():
        answered = asyncio.Event()

        async def produce():
            yield first
            await asyncio.wait_for(answered.wait(), timeout=10)
            yield second

        items = []
        async with AsyncTeacherClient(teacher_url) as client:
            async for item in client.score_stream(produce()):
                items.append(item)
                answered.set()
        return items

    items = asyncio.run(run())
    assert [i.frame for i in items if i.score is not None] == [0, 1] and items[-1].done


def test_an_error_in_the_callers_frames_reaches_the_caller(teacher_url):
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}

    def failing():
        yield good
        raise RuntimeError("generation failed")

    with TeacherClient(teacher_url) as client:
        with pytest.raises(RuntimeError, match="generation failed"):
            list(client.score_stream(failing()))
        bad = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [-5]}]}
        with pytest.raises(InvalidRequest) as error:  # checked before it is sent, as /score does
            list(client.score_stream([good, bad]))
        assert error.value.param == "sequences.0.completion_ids.0"
        with pytest.raises(TypeError, match="a dict of its fields .* not tuple"):
            list(client.score_stream([good, ([1, 2], [5, 6])]))  # a pair, not a request
        assert len(list(client.score_stream([good]))) == 2  # the client is still usable


def test_async_stream_takes_a_plain_iterable_as_the_sync_one_does(teacher_url):
    good = {"sequences": [((1, 2), (5, 6))]}  # the pair form, as score() takes it

    async def run():
        async with AsyncTeacherClient(teacher_url) as client:
            return [item async for item in client.score_stream([good, good])]

    items = asyncio.run(run())
    assert sorted(i.frame for i in items if i.score is not None) == [0, 1] and items[-1].done


def test_a_sync_stream_leaves_no_thread_behind_however_it_ends(teacher_url):
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    bad = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [-5]}]}
    with TeacherClient(teacher_url) as client:
        assert list(client.score_stream([good]))[-1].done  # to the end
        with pytest.raises(InvalidRequest):
            list(client.score_stream([good, bad]))  # the caller's input fails
        early = client.score_stream([good, good])
        next(early)
        early.close()  # the caller stops reading
    assert not [t for t in threading.enumerate() if t.name == "stream-loop"]


BLOCKED_BODY = """
import sys, threading
from shared.client import TeacherClient

def frames():
    yield {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    threading.Event().wait()  # a producer that never comes back

stream = TeacherClient(sys.argv[1]).score_stream(frames())
next(stream)
stream.close()
print("done")
"""


def test_a_body_that_blocks_forever_does_not_keep_the_process_alive(teacher_url):
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_BODY, teacher_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr


def test_a_stream_to_a_replica_that_is_down_says_so_and_sits_it_out(teacher_url):
    down = f"http://127.0.0.1:{free_port()}"
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    with TeacherClient([down, teacher_url]) as client:
        with pytest.raises(TeacherUnreachable, match=down):
            list(client.score_stream([good], url=down))
        assert not client.is_up(down)
        assert list(client.score_stream([good]))[-1].done  # goes to the live replica


def test_a_stream_that_sends_nothing_for_the_timeout_says_so_and_the_replica_stays_up():
    backend = GatedBackend(str(TEACHER_PATH))  # takes the frame, answers when the gate opens
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    with serve(create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)) as url:
        try:
            with TeacherClient(url, timeout=0.5) as client:
                with pytest.raises(TeacherTimedOut, match="sent nothing for 0.5 s"):
                    list(client.score_stream([good]))
                assert client.is_up(url)  # slow is not down
        finally:
            backend.gate.set()


def test_a_bad_frame_gets_an_error_frame_and_the_rest_are_scored(teacher_url):
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    bad = {"sequences": [{"prompt_ids": [1], "completion_ids": [99]}]}
    with TeacherClient(teacher_url) as client:
        items = list(client.score_stream(iter([good, bad, good])))
    errors = [i for i in items if i.error]
    assert len(errors) == 1 and errors[0].frame == 1
    assert (
        errors[0].error["param"] == "sequences.0.completion_ids"
        and "out of range" in errors[0].error["message"]
    )
    assert sorted(i.frame for i in items if i.score is not None) == [0, 2]


def test_broken_framing_ends_the_stream_saying_why_after_answering_the_frames_before(teacher_url):
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    body = encode_request_frame(ScoreRequest.model_validate(good))
    body += (100).to_bytes(4, "little") + b"short"
    r = httpx.post(teacher_url + "/score/stream", content=body, headers={"Content-Type": FRAMES})
    reader = FrameReader(2**20)
    items = [decode_stream_item(p) for p in reader.feed(r.content)]
    assert [i.frame for i in items if i.score is not None] == [0]  # the whole frame is answered
    error, done = items[-2:]
    assert error.frame == 1 and "inside a frame" in error.error["message"]
    assert error.error["code"] == 400 and done.done


def test_an_oversize_frame_is_413_and_the_frames_around_it_are_scored():
    """As /score answers a body over --max-body-mb; the stream reads past that frame and goes on
    (all of it arriving in one chunk, the oversize frame's header among whole frames)."""
    app = create_app(TeacherSettings(model=str(TEACHER_PATH), max_body_mb=0.01))  # 10 KiB
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    frame = encode_request_frame(ScoreRequest.model_validate(good))
    body = frame + frame + frame_bytes(b"x" * 20_000) + frame
    with serve(app) as url:
        r = httpx.post(url + "/score/stream", content=body, headers={"Content-Type": FRAMES})
    items = [decode_stream_item(p) for p in FrameReader(2**20).feed(r.content)]
    assert sorted(i.frame for i in items if i.score is not None) == [0, 1, 3]
    [error] = [i for i in items if i.error]
    assert error.frame == 2 and error.error["code"] == 413
    assert (
        error.error["type"] == "payload_too_large"
        and "exceeds 10485 bytes" in error.error["message"]
    )
    assert items[-1].done and items[-1].frames == 4


def test_garbage_after_a_frame_is_said_to_be_broken_framing_not_only_an_oversize_frame(
    teacher_url,
):
    """JSON sent where frames belong: its first four bytes read as a length of about 2 GB."""
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    frame = encode_request_frame(ScoreRequest.model_validate(good))
    body = frame + json.dumps(good).encode()
    r = httpx.post(teacher_url + "/score/stream", content=body, headers={"Content-Type": FRAMES})
    items = [decode_stream_item(p) for p in FrameReader(2**20).feed(r.content)]
    assert [i.frame for i in items if i.score is not None] == [0]
    too_large, broken = sorted((i for i in items if i.error), key=lambda i: i.frame)
    assert too_large.frame == 1 and too_large.error["code"] == 413
    assert broken.frame == 2 and broken.error["code"] == 400
    assert "broken framing" in broken.error["message"] and items[-1].done


def test_a_full_queue_holds_a_stream_back_instead_of_refusing_its_frames():
    """Frames beyond the queue's room wait (the body is not read meanwhile) and are all scored,
    where /score would answer 429; a frame larger than the queue on its own is taken when it
    empties, as /score takes such a body."""
    backend = GatedBackend(str(TEACHER_PATH), max_queue_tokens=20)
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    seqs = [([1] * 6, [5] * 4)] * 12  # 10 tokens each: a frame of 3 is 30, over the limit alone
    with serve(app) as url, TeacherClient(url) as client:
        backend.gate.set()
        items = list(client.score_stream(iter(frames_of(seqs, 3))))
    assert not [i for i in items if i.error]
    assert sorted((i.frame, i.index) for i in items if i.score is not None) == [
        (f, i) for f in range(4) for i in range(3)
    ]


def test_stream_needs_its_content_type(teacher_url):
    r = httpx.post(
        teacher_url + "/score/stream", content=b"", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type"


class CrashingBackend(HFBackend):
    """The real hf backend, failing its next `crashes` batches as a CUDA out-of-memory would."""

    crashes = 0

    def score_batch(self, jobs):
        if self.crashes:
            self.crashes -= 1
            raise RuntimeError("CUDA out of memory")
        return super().score_batch(jobs)


class PoisonedBackend(HFBackend):
    """The real hf backend, failing every batch that holds a sequence with the POISON token, as a
    forward that fails on some inputs would."""

    POISON = 13

    def score_batch(self, jobs):
        if any(self.POISON in job.input_ids for job in jobs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().score_batch(jobs)


def test_a_backend_failure_is_an_error_frame_and_the_stream_still_ends_properly():
    backend = CrashingBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    with serve(app) as url, TeacherClient(url) as client:
        backend.crashes = 1
        items = list(client.score_stream(iter([good])))
        assert items[0].error["code"] == 500 and "RuntimeError" in items[0].error["message"]
        assert (items[0].frame, items[0].index) == (0, 0)  # the sequence that failed, by name
        assert items[-1].done and items[-1].sequences == 0
        assert len(list(client.score_stream(iter([good])))) == 2  # the server keeps serving


def test_a_failure_outside_the_forward_still_answers_the_frame_and_ends_the_stream(
    teacher_url, monkeypatch
):
    # A bug in writing one frame's result (here, made on purpose) is that frame's 500; the
    # stream goes on to its done frame rather than stopping without one.
    encode = routes_stream.encode_stream_score

    def fails_for_frame_0(frame, *args):
        if frame == 0:
            raise KeyError("a bug")
        return encode(frame, *args)

    monkeypatch.setattr(routes_stream, "encode_stream_score", fails_for_frame_0)
    frame = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    with TeacherClient(teacher_url) as client:
        items = list(client.score_stream(iter([frame, frame])))
    [error] = [i for i in items if i.error]
    assert (error.frame, error.index, error.error["code"]) == (0, None, 500)
    assert "KeyError" in error.error["message"]
    assert [i.frame for i in items if i.score is not None] == [1]
    assert items[-1].done and (items[-1].frames, items[-1].sequences) == (2, 1)


def test_a_sequence_that_fails_is_an_error_frame_and_its_siblings_are_scored(teacher):
    backend = PoisonedBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    completions = [[5, 6, 7], [5, PoisonedBackend.POISON, 7], [8, 9], [6]]
    frame = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": c} for c in completions]}
    with serve(app) as url, TeacherClient(url) as client:
        items = list(client.score_stream(iter([frame])))
    errors = [item for item in items if item.error is not None]
    scores = {item.index: item.score for item in items if item.score is not None}
    assert [(e.frame, e.index, e.error["code"]) for e in errors] == [(0, 1, 500)]
    assert sorted(scores) == [0, 2, 3] and items[-1].done and items[-1].sequences == 3
    for i in scores:  # the siblings' scores are the real ones
        logp = reference_logp(teacher[0], [1, 2], completions[i])
        want = logp[range(len(completions[i])), completions[i]].numpy()
        np.testing.assert_allclose(scores[i].logprobs, want, atol=1e-5)


class CutOffStream(http.server.BaseHTTPRequestHandler):
    """Answers a stream with one result frame, or part of one, and hangs up, as a dying replica
    would."""

    cut = 0  # bytes of the frame left unsent

    def do_POST(self):  # noqa: N802 (the name http.server calls)
        while size := int(self.rfile.readline(), 16):  # read the chunked request body
            self.rfile.read(size + 2)
        self.rfile.readline()
        score = SequenceScore(logprobs=np.zeros(2, np.float32))
        self.send_response(200)
        self.send_header("content-type", FRAMES)
        self.end_headers()
        frame = encode_stream_score(0, 0, score, 0.0)
        self.wfile.write(frame[: len(frame) - self.cut])

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("cut", [0, 3], ids=["between frames", "inside a frame"])
def test_a_stream_cut_off_before_its_done_frame_raises_a_server_error(cut):
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    handler = type("Cut", (CutOffStream,), {"cut": cut})
    with plain_http(handler) as url:
        with TeacherClient(url) as client, pytest.raises(ServerError, match="done frame"):
            list(client.score_stream([good]))

        async def stream_async():
            async with AsyncTeacherClient(url) as client:

                async def frames():
                    yield good

                return [item async for item in client.score_stream(frames())]

        with pytest.raises(ServerError, match="done frame"):
            asyncio.run(stream_async())


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


@contextlib.contextmanager
def stream_by_hand(url: str, first: bytes) -> Iterator[socket.socket]:
    """A /score/stream request on a raw socket, its head and `first` sent: the test sends the
    rest, or hangs up, when it likes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /score/stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: " + FRAMES.encode() + b"\r\n\r\n" + first
        )
        yield sock


def test_a_client_that_goes_away_cancels_the_scoring_of_what_it_sent():
    backend = CountingGatedBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    one = encode_request_frame(validate_request(frames_of([([1, 2], [5, 6])], 1)[0]))
    with serve(app) as url:
        with stream_by_hand(url, chunk(one)) as sock:
            assert backend.running.wait(timeout=30)  # the first frame is at the gate
            sock.sendall(chunk(one) + b"0\r\n\r\n")  # the second waits in the queue
            time.sleep(0.2)
        # The client has gone with its body complete: the stream ends without scoring more.
        wait_for(lambda: 'route="/score/stream"' in httpx.get(url + "/metrics").text)
        backend.gate.set()
        wait_for(lambda: backend.sequences == 1)
        time.sleep(0.5)
        assert backend.sequences == 1


def test_a_client_that_goes_away_mid_body_is_noticed_while_its_frames_wait_for_room():
    """Its frames already queued are dropped and those waiting for room never queue, though the
    queue stays full (they were scored once room came, the reader noticing only then)."""
    backend = CountingGatedBackend(str(TEACHER_PATH), max_queue_tokens=10)
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    one = encode_request_frame(validate_request(frames_of([([1, 2], [5, 6])], 1)[0]))  # 4 tokens
    with serve(app) as url:
        with stream_by_hand(url, chunk(one)) as sock:
            assert backend.running.wait(timeout=30)  # the first frame is at the gate
            sock.sendall(chunk(one * 4))  # two fill the queue, the third waits for room
            wait_for(lambda: backend.queue_depth() == 2)
        # Gone mid-body: the stream ends while the queue is still full.
        wait_for(lambda: 'route="/score/stream"' in httpx.get(url + "/metrics").text)
        backend.gate.set()
        wait_for(lambda: backend.sequences == 1)
        time.sleep(0.5)
        assert backend.sequences == 1


class RefusesAtOnce(http.server.BaseHTTPRequestHandler):
    """Answers 401 without reading the body, as a teacher with another API key does."""

    def do_POST(self):
        body = b'{"error": {"message": "no", "type": "unauthorized", "param": null, "code": 401}}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_stream_that_ends_before_its_slow_input_leaves_no_warning_behind(recwarn):
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    asked_again = threading.Event()

    def slow():
        yield good
        time.sleep(0.3)  # the stream has ended by now
        asked_again.set()
        yield good

    with plain_http(RefusesAtOnce) as url, TeacherClient(url, max_retries=0) as client:
        with pytest.raises(Unauthorized):
            list(client.score_stream(slow()))
    assert asked_again.wait(timeout=5)
    time.sleep(0.2)  # the reading thread offers its item to a stream that is gone
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_a_frame_that_finds_no_room_for_long_is_refused_as_score_would_be(monkeypatch):
    """Waiting for room has a limit (a worker that never frees the queue must not hang streams)."""
    monkeypatch.setattr(scoring, "QUEUE_WAIT_S", 0.3)
    backend = GatedBackend(str(TEACHER_PATH), max_queue_tokens=20)
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    seqs = [([1] * 6, [5] * 4)] * 6  # frames of 2 x 10 tokens: the queue holds one
    with serve(app) as url, TeacherClient(url) as client:
        stream = client.score_stream(iter(frames_of(seqs, 2)))
        try:  # frame 0 is at the gate, frame 1 fills the queue, frame 2 finds no room
            first = next(stream)
        finally:
            backend.gate.set()
        items = [first, *stream]
    [error] = [i for i in items if i.error]
    assert error.frame == 2 and error.error["code"] == 429
    assert sorted(i.frame for i in items if i.score is not None) == [0, 0, 1, 1]


class AnswersNoFrame(http.server.BaseHTTPRequestHandler):
    """Reads the whole stream, then says it answered none of it (a teacher that lost frames)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        while (size := int(self.rfile.readline().strip(), 16)) > 0:
            self.rfile.read(size + 2)  # a chunk and its CRLF
        self.rfile.readline()
        body = encode_stream_done(0, 0)  # a whole frame, its length first
        self.send_response(200)
        self.send_header("Content-Type", FRAMES)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_frames_the_teacher_did_not_answer_are_an_error_not_silence():
    good = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6]}]}
    with plain_http(AnswersNoFrame) as url, TeacherClient(url) as client:
        with pytest.raises(ServerError, match="answered 0 of the 2 frames sent"):
            list(client.score_stream([good, good]))


def scored_tokens(url: str) -> float:
    return metric(url, "opd_teacher_tokens_scored_total")


def unread_results_case(n_frames: int) -> tuple[bytes, TeacherSettings]:
    """Frames whose results far outweigh them (top-20 at each position), and a short queue so that
    frames are taken as scoring goes, not all at once."""
    rng = np.random.default_rng(0)
    frame = {
        "sequences": [
            {"prompt_ids": [1, 2], "completion_ids": rng.integers(3, 20, 64).tolist()}
            for _ in range(8)
        ],
        "top_k": 20,
    }
    body = b"".join(chunk(encode_request_frame(validate_request(frame))) for _ in range(n_frames))
    return body, TeacherSettings(model=str(TEACHER_PATH), max_top_k=20, max_queue_tokens=1024)


def send_all_then_read(url: str, body: bytes, quiet_s: float = 0.0) -> tuple[float, list]:
    """POST /score/stream over a raw socket that reads nothing until scoring stops, and for
    `quiet_s` at least (as a client that is not full duplex): the tokens scored by then, and the
    stream's items."""
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(
            b"POST /score/stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: " + FRAMES.encode() + b"\r\n\r\n" + body + b"0\r\n\r\n"
        )
        time.sleep(quiet_s)
        counts = [-1.0, scored_tokens(url)]
        while counts[-1] != counts[-2]:  # until scoring stops
            time.sleep(1.0)
            counts.append(scored_tokens(url))
        sock.settimeout(60)
        received = bytearray()
        while not received.endswith(b"0\r\n\r\n"):
            received += sock.recv(1 << 20)
    items = FrameReader(2**30).feed(dechunk(bytes(received).split(b"\r\n\r\n", 1)[1]))
    return counts[-1], [decode_stream_item(item) for item in items]


def test_a_client_that_leaves_its_results_unread_is_held_back_and_loses_nothing(monkeypatch):
    """Results are many times the frames' size: a client that sends without reading must not grow
    the teacher's memory without end. The teacher stops reading frames; once the client reads, every
    frame is answered."""
    monkeypatch.setattr("services.teacher.routes_stream.MAX_UNREAD_BYTES", 1)
    n_frames = 120  # 61,440 tokens, 10 MB of results: more than the sockets' buffers hold
    body, settings = unread_results_case(n_frames)
    with serve(create_app(settings)) as url:
        scored_while_unread, items = send_all_then_read(url, body)
        assert scored_while_unread < n_frames * 8 * 64 / 2
        assert scored_tokens(url) == n_frames * 8 * 64
    assert len(items) == n_frames * 8 + 1 and items[-1].done


def test_a_client_that_never_reads_while_sending_gets_errors_not_a_stream_without_end(
    monkeypatch,
):
    """Held back past UNREAD_WAIT_S, the teacher refuses the rest of the frames in small error
    frames, so a client that reads only after sending everything is answered for every frame."""
    monkeypatch.setattr("services.teacher.routes_stream.MAX_UNREAD_BYTES", 1)
    monkeypatch.setattr("services.teacher.routes_stream.UNREAD_WAIT_S", 0.5)
    n_frames = 120
    body, settings = unread_results_case(n_frames)
    with serve(create_app(settings)) as url:
        _, items = send_all_then_read(url, body)
        tokens = scored_tokens(url)
    refused = {item.frame for item in items if item.error is not None}
    scored = [item for item in items if not item.done and item.error is None]
    assert refused and len(scored) == (n_frames - len(refused)) * 8 == tokens / 64
    assert all(item.error["type"] == "queue_full" for item in items if item.error is not None)
    assert "read results while sending frames" in next(i for i in items if i.error).error["message"]
    assert items[-1].done and items[-1].frames == n_frames


def dechunk(data: bytes) -> bytes:
    """The body of a chunked transfer encoding."""
    parts, at = [], 0
    while True:
        end = data.index(b"\r\n", at)
        size = int(data[at:end], 16)
        if size == 0:
            return b"".join(parts)
        parts.append(data[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


def test_a_frame_being_decoded_holds_up_no_other_request(teacher_url, monkeypatch):
    """A frame is up to --max-body-mb: decoded on the event loop (8 MiB of empty msgpack arrays
    took 3.3 s), it held up health checks and every other stream meanwhile."""
    request = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [5, 6, 7]}]}

    def send():
        with TeacherClient(teacher_url) as client:
            return list(client.score_stream([request]))

    items = held_while_health_answers(
        monkeypatch, teacher_url, routes_stream, "decode_request", send
    )
    assert [item.index for item in items if not item.done] == [0]


def test_a_client_sending_tiny_frames_without_reading_is_held_back_not_answered_without_end(
    monkeypatch,
):
    """Once it has not read for UNREAD_WAIT_S each further frame gets a refusal: 156 bytes for a
    frame of 5, so such a client grew the teacher's memory without end. Refusals stop at twice
    the unread limit, and the teacher reads no more frames until the client reads."""
    monkeypatch.setattr(routes_stream, "MAX_UNREAD_BYTES", 300)
    monkeypatch.setattr(routes_stream, "UNREAD_WAIT_S", 0.3)
    most = [0]
    put = routes_stream.Outbox.put

    async def put_and_measure(self, item):
        await put(self, item)
        most[0] = max(most[0], self._bytes)

    monkeypatch.setattr(routes_stream.Outbox, "put", put_and_measure)
    n_frames = 40_000  # refusals past what the sockets' buffers hold (megabytes on loopback)
    body = b"".join(chunk(frame_bytes(msgpack.packb(0))) for _ in range(n_frames))
    with serve(create_app(TeacherSettings(model=str(TEACHER_PATH)))) as url:
        _, items = send_all_then_read(url, body, quiet_s=5.0)
    assert most[0] <= 2 * 300 + 200  # a refusal's size past the bound at most
    assert len([item for item in items if item.error is not None]) == n_frames  # each answered
    assert items[-1].done and items[-1].frames == n_frames
