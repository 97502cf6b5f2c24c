"""start_teacher: a server whose model cannot load, or that refuses its settings, is reported at once
with the reason, and stopped; a 500 from something else on the port is reported too; a teacher
outlives no process that started it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from opd.bundled import REPO_ROOT, TEACHER_PATH
from services.teacher.process import SHUTDOWN_WAIT_S, free_port, start_teacher, stop, wait_ready
from shared.protocol import ScoreRequest, encode_request_frame
from tests.conftest import canned, metric, plain_http, wait_for


def test_a_model_that_cannot_load_fails_fast_with_the_reason(tmp_path):
    # A folder that passes opd-teacher's checks before it starts (a config, a weights file) and is
    # no model: the load in the server fails, and says why.
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
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


def test_waiting_for_a_teacher_on_loopback_goes_around_a_proxy_in_the_environment(
    teacher_url, monkeypatch
):
    # A proxy cannot reach this machine's loopback: asked to, it would keep the teacher "not
    # ready" until the timeout. (Port 9, discard, refuses the connection here.)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    wait_ready(teacher_url, timeout=5)


PARENT = f"""
from opd.bundled import REPO_ROOT, TEACHER_PATH
from services.teacher.process import start_teacher
proc, _ = start_teacher({str(TEACHER_PATH)!r})
print(proc.pid, flush=True)
input()  # until killed
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_a_teacher_whose_stream_a_client_holds_open():
    """A client mid-stream (a trainer mid-step, or one that never ends its body) does not hold a
    stopping server until SIGKILL: requests in flight get SHUTDOWN_WAIT_S, then it exits."""
    proc, url = start_teacher(str(TEACHER_PATH), threads=1)
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as held:
            held.sendall(
                b"POST /score/stream HTTP/1.1\r\nHost: teacher\r\nTransfer-Encoding: chunked"
                b"\r\nContent-Type: application/x-opd-frames\r\n\r\n"
            )
            # One frame, scored: the handler is running, and now waits for the next frame.
            frame = encode_request_frame(
                ScoreRequest(sequences=[{"prompt_ids": [1, 21], "completion_ids": [18, 5]}])
            )
            held.sendall(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
            wait_for(lambda: metric(url, "opd_teacher_tokens_scored_total") == 2)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # Not held until a SIGKILL; uvicorn raises the signal again once it has shut down.
            assert proc.wait(timeout=SHUTDOWN_WAIT_S + 20) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled > SHUTDOWN_WAIT_S - 1  # the stream held it till then
    finally:
        stop(proc)


def test_a_teacher_stops_when_the_process_that_started_it_is_killed():
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    line = parent.stdout.readline()  # the teacher's pid, once it is up
    assert line.strip().isdigit(), "the parent could not start a teacher"
    teacher = int(line)
    try:
        parent.kill()  # SIGKILL: the parent cannot stop it itself
        parent.wait()
        deadline = time.monotonic() + 30
        while alive(teacher) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(teacher)
    finally:
        if alive(teacher):
            os.kill(teacher, signal.SIGKILL)


STUCK_LOAD = """
import sys, threading, uvicorn
from opd.bundled import TEACHER_PATH
from services.teacher.app import create_app
from services.teacher.backends.hf import HFBackend
from services.teacher.settings import TeacherSettings

class StuckLoad(HFBackend):
    def load(self):  # as a large model's, minutes long
        threading.Event().wait()

app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=StuckLoad(str(TEACHER_PATH)))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_teacher_whose_model_is_still_loading_stops_at_once(sig):
    """Stopping (or Ctrl-C) a teacher that is loading a model need not wait for the load."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", STUCK_LOAD, str(port)], cwd=REPO_ROOT)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), timeout=60)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) in (0, -sig)  # uvicorn may raise the signal again
    finally:
        stop(proc)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def alive(pid: int) -> bool:
    """Running, not gone and not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
