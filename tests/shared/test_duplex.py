"""The full-duplex stream client's own failure paths, against raw TCP peers that misbehave as a
broken server or proxy would (the teacher's good path is in tests/teacher/test_routes_stream.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from shared.duplex import _hand_over, open_stream


@contextlib.contextmanager
def raw_peer(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server on loopback that hands each connection to `answer` (in a thread)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed: the test is over
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()


def silent(conn: socket.socket) -> None:
    """Reads the request and never answers."""
    with conn:
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass


def cut_mid_body(conn: socket.socket) -> None:
    """Reads the whole request, answers a chunked response's head and part of a chunk, closes."""
    with conn:
        received = b""
        while not received.endswith(b"0\r\n\r\n"):
            received += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc")


def test_a_server_that_never_answers_is_a_read_timeout_once_the_input_has_ended():
    with raw_peer(silent) as url:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout, match="sent nothing for 1"):
            with open_stream(url, "/score/stream", {}, [b"frame"], timeout=1) as response:
                response.read()
        assert time.monotonic() - started < 10


def test_a_response_cut_off_mid_body_is_a_protocol_error():
    with raw_peer(cut_mid_body) as url:
        with pytest.raises(httpx.RemoteProtocolError):
            with open_stream(url, "/score/stream", {}, [b"frame"], timeout=5) as response:
                list(response.iter_bytes())


def test_a_body_item_that_is_not_bytes_reaches_the_caller():
    with raw_peer(silent) as url:
        with pytest.raises(TypeError, match="must be bytes, not str"):
            with open_stream(url, "/score/stream", {}, ["text"], timeout=5) as response:
                response.read()


@pytest.mark.parametrize("error", [ValueError, FileNotFoundError, ConnectionResetError])
def test_what_the_body_raises_reaches_the_caller_even_an_os_error(error):
    """An OSError reading the caller's own input (a rollout file gone) is the caller's, not a
    broken connection: the client would blame the replica and send it to sit out."""

    def body():
        yield b"frame"
        raise error("the caller's own")

    with raw_peer(silent) as url:
        with pytest.raises(error, match="the caller's own"):
            with open_stream(url, "/score/stream", {}, body(), timeout=5) as response:
                response.read()


def test_the_end_of_a_body_is_queued_without_a_task_a_stopping_loop_could_strand():
    # The reading thread hands over the body's end without waiting; the loop may stop right after
    # it gets there (the stream failed), so the hand-over must not leave a put task to run later.
    loop = asyncio.new_event_loop()
    items: asyncio.Queue = asyncio.Queue(maxsize=1)
    try:
        assert _hand_over(items, "end", loop, wait=False)
        loop.call_soon(loop.stop)
        loop.run_forever()  # one pass: the hand-over's callback runs, and the loop stops
        assert items.get_nowait() == "end"
        assert not asyncio.all_tasks(loop)
    finally:
        loop.close()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21", "http://"])
def test_a_url_that_is_not_http_is_refused_before_connecting(url):
    with pytest.raises(httpx.UnsupportedProtocol):
        with open_stream(url, "/score/stream", {}, [], timeout=1):
            pass


def test_a_body_item_for_a_loop_that_stopped_is_dropped_not_waited_for_forever():
    # Never run: as a stream's loop that stopped before it took the item.
    loop = asyncio.new_event_loop()
    returned = []
    reader = threading.Thread(
        target=lambda: returned.append(_hand_over(asyncio.Queue(), b"x", loop, wait=True)),
        daemon=True,
    )
    reader.start()
    reader.join(timeout=5)
    loop.close()
    assert returned == [False]  # the body's reading thread ends instead of blocking for good
