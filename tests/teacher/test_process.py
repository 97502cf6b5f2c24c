"""start_teacher: a server whose model cannot load, or that refuses its settings, is reported at once
with the reason, and stopped; a 500 from something else on the port is reported too."""

from __future__ import annotations

import time

import httpx
import pytest

from services.teacher.process import free_port, start_teacher, wait_ready
from tests.conftest import canned, plain_http


def test_a_model_that_cannot_load_fails_fast_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a folder that is not a model
    port = free_port()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="failed to load"):
        start_teacher(str(tmp_path), port=port, threads=1, ready_timeout=120)
    assert time.monotonic() - started < 60
    with pytest.raises(httpx.ConnectError):  # the server process is gone
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_a_server_that_refuses_its_settings_says_why_through_start_teacher(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited with code 2: .*no config\.json"):
        start_teacher(str(tmp_path), threads=1)  # no log file asked for: the reason still shows


def test_a_500_in_another_shape_while_waiting_is_reported_not_a_crash():
    # Another server on the port, say.
    with plain_http(canned(500, b"Internal Server Error")) as url:
        with pytest.raises(RuntimeError, match="HTTP 500: Internal Server Error"):
            wait_ready(url, timeout=10)
