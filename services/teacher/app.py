"""The teacher server's app factory: state, lifespan (background model load), errors and metrics.

app = create_app(TeacherSettings(model="models/tiny-teacher"))
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI, Request, Response
from starlette.requests import ClientDisconnect

from services.teacher import routes_openai, routes_stream, routes_trl
from services.teacher.backends.base import Backend
from services.teacher.metrics import TeacherMetrics
from services.teacher.routes import router
from services.teacher.scoring import Limits
from services.teacher.settings import TeacherSettings
from shared.web import VERSION, install_error_shape

log = logging.getLogger("opd.teacher")
T = TypeVar("T")


@dataclass
class TeacherState:
    settings: TeacherSettings
    backend: Backend
    metrics: TeacherMetrics
    limits: Limits | None = None  # set once the model is loaded
    load_error: str | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


def build_backend(settings: TeacherSettings, metrics: TeacherMetrics) -> Backend:
    if settings.backend == "hf":
        from services.teacher.backends.hf import HFBackend

        return HFBackend(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            max_batch_tokens=settings.max_batch_tokens,
            max_seq_len=settings.max_seq_len,
            max_queue_tokens=settings.max_queue_tokens,
            trust_remote_code=settings.trust_remote_code,
            share_prompts=settings.share_prompts,
            metrics=metrics,
        )
    from services.teacher.backends.vllm import VLLMBackend

    return VLLMBackend(
        settings.model,
        dtype=settings.dtype,
        max_seq_len=settings.max_seq_len,
        max_top_k=settings.max_top_k,
        max_batch_tokens=settings.max_batch_tokens,
        tensor_parallel_size=settings.tensor_parallel_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        trust_remote_code=settings.trust_remote_code,
        max_queue_tokens=settings.max_queue_tokens,
    )


def create_app(settings: TeacherSettings, backend: Backend | None = None) -> FastAPI:
    """A teacher app; the model loads in the background after start-up (/ready says when)."""
    metrics = TeacherMetrics()
    state = TeacherState(settings, backend or build_backend(settings, metrics), metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.tasks.append(asyncio.create_task(_load(state)))
        yield
        for task in state.tasks:
            task.cancel()
        await state.backend.close()

    app = FastAPI(
        title="OPD teacher",
        description="Per-token teacher log-probs for on-policy distillation.",
        version=VERSION,
        lifespan=lifespan,
    )
    app.state.teacher = state
    app.include_router(router)
    app.include_router(routes_stream.router)
    app.include_router(routes_trl.router)
    app.include_router(routes_openai.router)
    _install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


async def _load(state: TeacherState) -> None:
    try:
        info = await _in_daemon_thread(state.backend.load)
        await state.backend.start()
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("could not load the model: %s", state.load_error)
        return
    state.limits = Limits.of(info, state.settings.max_top_k)
    log.info("ready: %s (%s, %s) on %s", info.model, info.backend, info.dtype, info.device)


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """fn() in a daemon thread, not asyncio's executor, whose threads the interpreter waits for at
    exit: a teacher stopped (Ctrl-C) while a model loads, for minutes, exits at once."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # not cancelled meanwhile (the server stopping)
            outcome()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome = functools.partial(done.set_exception, exc)
        else:
            outcome = functools.partial(done.set_result, result)
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop has closed: nobody waits for it
            pass

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return await done


def _install_error_handlers(app: FastAPI) -> None:
    install_error_shape(app)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client went away while sending its body: no one to answer, and nothing failed here.
        # 499 (nginx's "client closed request") keeps it apart from our own errors in /metrics.
        log.info("client went away while sending %s", request.url.path)
        return Response(status_code=499)


class MetricsMiddleware:
    """Counts requests by route and status and times them (pure ASGI: streaming passes through)."""

    def __init__(self, app, metrics: TeacherMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: str | None = None  # the answer's, once it has begun
        unanswered = "500"  # an exception before it: the error middleware answers 500
        start = time.perf_counter()

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except asyncio.CancelledError:
            # Cut off by the server's shutdown (its 10 s for requests in flight): no error of
            # ours, and nobody answers it, so a rolling restart shows no 500s.
            unanswered = "cancelled"
            raise
        finally:
            route = scope.get("route")
            # Unmatched paths share one label, so scanners cannot blow up the label set.
            name = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(name, status or unanswered).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
