"""Start a teacher server in a child process and wait until it is ready (demo, tests, benches)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

# Set by start_teacher to its own pid: the teacher it starts stops when that process is gone, even
# killed (SIGKILL, the kernel's out-of-memory killer) before it could stop the teacher itself.
PARENT_ENV = "OPD_EXIT_WITH_PARENT"
SHUTDOWN_S = 30.0
# On SIGTERM or Ctrl-C, requests in flight get this long to finish; a stream still open then (a
# trainer mid-step, which scores its frames elsewhere) or a request still waiting is cut, rather
# than holding the process until a SIGKILL.
SHUTDOWN_WAIT_S = 10.0


def exit_with_parent() -> None:
    """In a teacher that start_teacher started: once the process that started us has gone (we are
    then someone else's child), stop as on SIGTERM, which uvicorn handles as a clean shutdown, and
    exit outright if that has not ended us within SHUTDOWN_S (a model still loading, a request
    that hangs). The variable goes, so nothing this teacher starts inherits it."""
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent or not parent.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(0.5)
        logging.getLogger("opd.teacher").warning(
            "process %s that started me is gone: stopping", parent
        )
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(SHUTDOWN_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_teacher(
    model: str,
    port: int | None = None,
    threads: int = 1,
    cpus: set[int] | None = None,
    extra_args: tuple[str, ...] = (),
    log_path: str | None = None,
    ready_timeout: float = 120.0,
) -> tuple[subprocess.Popen, str]:
    """`opd-teacher serve` on loopback in its own process, optionally pinned to `cpus`.
    Returns (process, base URL) once /ready answers 200."""
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "services.teacher.cli",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--log-level",
        "warning",
        *extra_args,
    ]
    # Without a log path the log still goes to a file, until the server is up: a server that exits
    # at once says why in its last line, and the error should too.
    if log_path:
        log = Path(log_path)
    else:
        fd, name = tempfile.mkstemp(prefix="opd-teacher-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with log.open("ab") as out:  # the child holds its own copy of the descriptor
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(proc.pid, cpus)
        wait_ready(url, proc, ready_timeout)
    except BaseException as exc:
        exited = proc.poll() is not None
        stop(proc)
        if exited and isinstance(exc, RuntimeError) and (said := _last_line(log)):
            raise RuntimeError(f"{exc}: {said}") from None
        raise
    finally:
        if not log_path:
            log.unlink(missing_ok=True)
    return proc, url


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Wait for the teacher this machine started at `url` (so never through a proxy from the
    environment, which cannot reach this machine's loopback) to load its model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"teacher at {url} exited with code {proc.returncode}")
        try:
            response = httpx.get(url + "/ready", timeout=2, trust_env=False)
        except httpx.TransportError:
            time.sleep(0.2)  # not listening yet
            continue
        if response.status_code == 200:
            return
        # 500: the model failed to load and never will (see deps.ready_state); 503 is loading.
        if response.status_code == 500:
            raise RuntimeError(f"teacher at {url}: {_error_message(response)}")
        time.sleep(0.2)
    raise TimeoutError(f"teacher at {url} not ready after {timeout:.0f} s")


def _error_message(response: httpx.Response) -> str:
    """The teacher's error message, or the start of a body in another shape (another server)."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {' '.join(response.text.split())[:200]}"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=SHUTDOWN_WAIT_S + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
