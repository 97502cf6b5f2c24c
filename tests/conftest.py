"""Fixtures shared by the suite: the bundled models, and real servers on loopback."""

from __future__ import annotations

import contextlib
import functools
import http.server
import itertools
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvicorn

from opd.bundled import STUDENT_PATH, TEACHER_PATH
from opd.models import load_model
from services.teacher.process import free_port

torch.set_num_threads(2)


@contextlib.contextmanager
def serve(
    app, ready_path: str | None = "/ready", timeout: float = 60.0, stop_timeout: float = 30.0
) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port in a thread; yields its base URL, and on
    leaving waits up to `stop_timeout` s for the server (its lifespan's shutdown too) to end."""
    import httpx

    # Bound here and handed over, so no other process can take the port in between.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    path = ready_path or "/health"
    while True:
        try:
            if server.started and httpx.get(url + path, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server at {url} did not become ready")
        time.sleep(0.05)

    def stopped() -> bool:
        server.should_exit = True
        thread.join(timeout=stop_timeout)
        sock.close()
        return not thread.is_alive()

    try:
        yield url
    except BaseException:  # the test's own failure is the one to report
        stopped()
        raise
    assert stopped(), f"server at {url} did not stop in {stop_timeout:g} s"


def teacher_with_another_tokenizer(folder: Path) -> Path:
    """A copy of the bundled teacher in `folder` whose tokenizer differs only in its chat
    template: the same token ids, another fingerprint (which a trainer must still refuse)."""
    shutil.copytree(TEACHER_PATH, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def wait_for(condition, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# The teacher's count of finished requests, labelled by route and status.
TEACHER_REQUESTS = "opd_teacher_requests_total"


def metric(url: str, sample: str, **labels: str) -> float:
    """The sum of the `sample` series (e.g. opd_teacher_requests_total) with these labels in the
    /metrics of the server at `url`; 0 when there is none yet."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


@contextlib.contextmanager
def plain_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A plain `http.server` on loopback in a thread (an HTTP server that is not a teacher)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def round_robin_balancer(urls: list[str]) -> Iterator[str]:
    """A TCP load balancer on loopback: each new connection goes to the next of `urls` and stays
    there, as HAProxy keeps a long request on one replica. Yields its base URL."""
    targets = itertools.cycle([urllib.parse.urlsplit(u) for u in urls])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stopped = threading.Event()

    pipes: list[threading.Thread] = []

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # the other side is gone, or the balancer closed
            pass

    def connect(client: socket.socket) -> None:
        target = next(targets)
        try:
            upstream = socket.create_connection((target.hostname, target.port), timeout=10)
            upstream.settimeout(None)
        except OSError:  # as a balancer whose replica is gone: the connection ends
            client.close()
            return
        ends = [
            threading.Thread(target=pipe, args=(src, dst), daemon=True)
            for src, dst in ((client, upstream), (upstream, client))
        ]
        for end in ends:
            end.start()
        for end in ends:
            end.join()
        client.close()
        upstream.close()

    def accept() -> None:
        while not stopped.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            pipes.append(threading.Thread(target=connect, args=(client,), daemon=True))
            pipes[-1].start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stopped.set()
        thread.join()
        listener.close()
        for connection in pipes:
            connection.join(timeout=5)


def canned(status: int, body: bytes, content_type: str = "text/plain", headers: dict | None = None):
    """A request handler that answers every GET and POST alike: a server, or a proxy in front of
    one, that is not a teacher."""

    class Canned(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer  # noqa: N815 (the names http.server calls)

        def log_message(self, *args) -> None:
            pass

    return Canned


@contextlib.contextmanager
def silent_host() -> Iterator[str]:
    """A URL whose connections never complete, as a host that drops packets: a listening socket
    whose one-place accept queue is held full, so the kernel leaves later handshakes unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        filler.close()
        listener.close()


def static_files(folder: Path) -> contextlib.AbstractContextManager[str]:
    """A plain web server serving `folder`."""
    return plain_http(
        functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    )


def a_closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connecting is refused at once."""
    return free_port()


def schema_keys(node) -> set[str]:
    """Every key anywhere in a JSON schema (pydantic writes a bound it cannot place as "gt"/"ge",
    which no JSON Schema reader knows)."""
    if isinstance(node, dict):
        return set(node) | set().union(*map(schema_keys, node.values()))
    if isinstance(node, list):
        return set().union(*map(schema_keys, node))
    return set()


def strict_json(body: bytes):
    """json.loads as a strict parser (JavaScript's, Go's) reads: no NaN or Infinity."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(body, parse_constant=refuse)


def main_imports_torch(module: str, argv: list[str]) -> bool:
    """Whether `module.main(argv)` (a --help, say) imports torch, in a fresh interpreter."""
    code = (
        f"import sys\nfrom {module} import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return run.stdout.split()[-1] == "True"


@pytest.fixture(scope="session")
def teacher():
    """(model, tokenizer) of models/tiny-teacher in float32."""
    return load_model(TEACHER_PATH)


@pytest.fixture(scope="session")
def student():
    return load_model(STUDENT_PATH)


@pytest.fixture(scope="session")
def teacher_url() -> Iterator[str]:
    """A real teacher server (hf backend, float32) on loopback, shared by the session."""
    from services.teacher.app import create_app
    from services.teacher.settings import TeacherSettings

    app = create_app(TeacherSettings(model=str(TEACHER_PATH), max_batch_tokens=4096, max_top_k=20))
    with serve(app) as url:
        yield url
