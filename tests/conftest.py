"""Fixtures shared by the suite: the bundled models, and real servers on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch
import uvicorn

from opd.models import STUDENT_PATH, TEACHER_PATH, load_model

torch.set_num_threads(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app, ready_path: str | None = "/ready", timeout: float = 60.0) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port in a thread; yields its base URL."""
    import httpx

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
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
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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
