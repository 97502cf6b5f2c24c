"""The trainer's HTTP control API: start, watch and stop distillation runs.

POST /runs                 body: a RunConfig (JSON) -> 201 {"id", "status"}; bad fields -> 422;
                           --max-runs already training -> 429
GET  /runs                 all runs
GET  /runs/{id}            status, config, latest step metrics, summary or error
GET  /runs/{id}/events     server-sent events: "started", step metrics, sample rollouts with teacher
                           scores, evaluations, and a final "done" (or "failed") event
POST /runs/{id}/stop       stop after the current step (a checkpoint is written)
GET  /metrics              Prometheus metrics of every run
GET  /health

opd-trainer serve --port 8100
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware
from transformers import PreTrainedTokenizerBase

from opd.models import ModelLoadError, check_config, check_loadable, load_tokenizer
from services.trainer.config import MAX_RUNS, RunConfig, in_api_words
from services.trainer.loop import (
    RunError,
    check_out,
    check_teacher_limits,
)
from services.trainer.runs import RunRecord, Runs, TrainerMetrics
from shared.client import AsyncTeacherClient
from shared.errors import (
    InvalidRequest,
    MalformedBody,
    NotReady,
    TeacherError,
    Unauthorized,
    UnsupportedMediaType,
    from_validation,
)
from shared.web import VERSION, install_error_shape, media_type, metrics_response

log = logging.getLogger("opd.trainer.api")
# On shutdown, how long to wait for runs to end their step and save a checkpoint.
SHUTDOWN_WAIT_S = 120.0

router = APIRouter()


def runs_of(request: Request) -> Runs:
    return request.app.state.runs


async def refuse_a_student_that_cannot_load(
    cfg: RunConfig,
) -> tuple[PreTrainedTokenizerBase, int | None]:
    """What can be known at once about the student (no weights are read), named by its field: its
    folder, weights files, config, tokenizer and device. Its tokenizer and vocabulary size, for the
    teachers' check."""
    try:
        folder = check_loadable(cfg.student, cfg.device)
        tokenizer = await asyncio.to_thread(load_tokenizer, folder)
        vocab = await asyncio.to_thread(check_config, folder, tokenizer)
    except ModelLoadError as exc:
        param = "device" if exc.setting == "device" else "student"
        raise InvalidRequest(f"{param}: {exc}", param=param) from None
    return tokenizer, vocab


async def refuse_teachers_that_cannot_serve(
    cfg: RunConfig, tokenizer, student_vocab: int | None
) -> None:
    """What the run would check first against each teacher replica, asked now: that it answers, takes
    the API key, speaks the student's tokenizer, holds its vocabulary, and allows the top-k and the
    longest sequence. A replica still loading passes: the run waits for it and checks it then."""
    ready, infos = [], []
    for url in cfg.teacher_url:
        try:
            async with AsyncTeacherClient(
                url, api_key=cfg.api_key, timeout=cfg.teacher_timeout_s
            ) as client:
                infos += await client.connect(tokenizer, wait_s=0)
        except NotReady:
            continue
        except Unauthorized as exc:
            raise InvalidRequest(exc.message, param="api_key") from None
        except TeacherError as exc:  # unreachable, another tokenizer, not a teacher at all
            raise InvalidRequest(exc.message, param="teacher_url") from None
        ready.append(url)
    if not ready:
        return
    try:
        ready_cfg = cfg.model_copy(update={"teacher_url": ready})
        check_teacher_limits(ready_cfg, infos, tokenizer, student_vocab)
    except RunError as exc:
        raise InvalidRequest(in_api_words(str(exc)), param=exc.param) from None


@router.post("/runs", status_code=201)
async def start_run(cfg: RunConfig, request: Request) -> dict:
    # Refused here, each naming its field, rather than in the run's thread after a 201.
    runs = runs_of(request)
    runs.refuse_when_full()
    runs.refuse_other_threads(cfg)
    refuse_a_folder_in_use(cfg, runs)
    tokenizer, vocab = await refuse_a_student_that_cannot_load(cfg)
    await refuse_teachers_that_cannot_serve(cfg, tokenizer, vocab)
    refuse_a_folder_in_use(cfg, runs)  # again: another request may have claimed it meanwhile
    record = runs.start(cfg)
    return {"id": record.id, "status": record.status}


def refuse_a_folder_in_use(cfg: RunConfig, runs: Runs) -> None:
    busy = runs.writing_to(cfg.out)
    if busy:  # its thread may not have written config.json yet, so check_out can't see it
        raise InvalidRequest(f"out {cfg.out} is in use by {busy.id} ({busy.status})", param="out")
    try:
        check_out(cfg)
    except RunError as exc:
        raise InvalidRequest(in_api_words(str(exc)), param=exc.param) from None


@router.get("/runs")
async def list_runs(request: Request) -> list[dict]:
    return [{"id": r.id, "status": r.status} for r in runs_of(request).records.values()]


@router.get("/runs/{run_id}")
async def get_run(run_id: str, request: Request) -> dict:
    # NaN and infinities (a diverging run's loss) become null: strict JSON has neither.
    return _finite(runs_of(request).get(run_id).view())


@router.post("/runs/{run_id}/stop", status_code=202)
async def stop_run(run_id: str, request: Request, response: Response) -> dict:
    """202 while the run finishes its step; 200 for a run that has ended already."""
    record = runs_of(request).get(run_id)
    record.stop.set()
    if record.finished:
        response.status_code = 200
    return {"id": record.id, "status": record.status, "stopping": not record.finished}


@router.get("/runs/{run_id}/events")
async def run_events(run_id: str, request: Request) -> Response:
    record = runs_of(request).get(run_id)
    # A follower that reconnects (a browser's EventSource does) goes on after the last event it
    # got, rather than from the oldest kept one again.
    after = request.headers.get("last-event-id", "")
    # Anything but an event number we could have sent (a 5,000-digit one, say) starts afresh.
    seen = int(after) if re.fullmatch(r"[0-9]{1,18}", after) else 0
    if record.finished and seen >= record.published:
        # Nothing will come: 204 tells an EventSource to stop reconnecting (a 200 with no events
        # has it reconnect every few seconds for good).
        return Response(status_code=204)
    return StreamingResponse(
        event_stream(record, after=seen),
        media_type="text/event-stream",
        # Each event as it happens: proxies (nginx) and caches must not hold it back.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def strict_json(event: dict) -> str:
    """`event` as strict JSON: NaN and infinities (a diverging run's loss) become null, as in
    GET /runs/{id}; a browser's JSON.parse refuses them otherwise."""
    return json.dumps(_finite(event), allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


async def event_stream(
    record: RunRecord, keep_alive_s: float = 15.0, after: int = 0
) -> AsyncIterator[str]:
    """The run's events as server-sent events, each with its number as its id, from the first
    kept one after number `after` to its last."""
    woken = asyncio.Event()
    record.followers.add(woken)
    try:
        sent = after
        while True:
            # Read before the events are taken: the run may publish and finish while they go out
            # (each yield can pause), and those last events must still be sent before the end.
            woken.clear()
            finished = record.finished
            events, sent = record.events_after(sent), record.published
            for number, event in events:
                yield f"event: {event['type']}\nid: {number}\ndata: {strict_json(event)}\n\n"
            if finished:
                return
            if record.published > sent or record.finished:
                continue
            try:
                await asyncio.wait_for(woken.wait(), timeout=keep_alive_s)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
    finally:
        record.followers.discard(woken)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return metrics_response(request.app.state.metrics.registry)


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


class TrainerServer(uvicorn.Server):
    """uvicorn, except that stopping (Ctrl-C, SIGTERM, `docker stop`) first asks every run to stop
    after its step. Their event streams then send the last events and end, so the wait for open
    connections is short and no follower is cut off before a run's `done`."""

    def __init__(self, app: FastAPI, host: str, port: int):
        super().__init__(
            uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=SHUTDOWN_WAIT_S)
        )
        self.trainer_app = app
        self.interrupted = False  # stopped by Ctrl-C (SIGINT)

    def handle_exit(self, sig, frame) -> None:
        # uvicorn's second Ctrl-C ends only its own wait for open connections, not the runs'.
        again = self.should_exit and sig == signal.SIGINT
        self.interrupted = self.interrupted or sig == signal.SIGINT
        state = self.trainer_app.state
        if getattr(state, "stop_deadline", None) is None:  # both waits below share the one budget
            state.stop_deadline = time.monotonic() + SHUTDOWN_WAIT_S
        runs = getattr(state, "runs", None)
        if runs is not None:
            runs.stop_each()
            if again:
                runs.give_up()
        super().handle_exit(sig, frame)


# The names a server on loopback answers to: a web page whose own name a DNS server points at
# 127.0.0.1 (DNS rebinding) would otherwise drive the API from the operator's browser.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def loopback_only(host: str) -> bool:
    """Whether a server listening on `host` is reachable only from this machine."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(max_runs: int = MAX_RUNS, allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The control API; `allowed_hosts`, if given, the Host headers it answers (others: 400)."""
    metrics = TrainerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.runs = Runs(asyncio.get_running_loop(), metrics, max_runs)
        yield
        # A server that stops (Ctrl-C, SIGTERM, `docker stop`) lets each run end its step and save
        # its checkpoint rather than killing it mid-step with the process.
        deadline = getattr(app.state, "stop_deadline", None)  # set by a signal, after uvicorn's
        # own wait for open connections (the runs' event streams) has used part of it
        wait = SHUTDOWN_WAIT_S if deadline is None else max(0.0, deadline - time.monotonic())
        left = await asyncio.to_thread(app.state.runs.stop_all, wait)
        if left:
            log.warning("stopped waiting for runs %s; they resume from their last checkpoint", left)

    app = FastAPI(title="OPD trainer", version=VERSION, lifespan=lifespan)
    app.state.metrics = metrics
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # As the teacher answers: a body in another form is a 415 and one that is not JSON a 400,
        # not a field's 422 (FastAPI reads neither as JSON, so a field would seem to be missing).
        first = exc.errors()[0]
        ctype = media_type(request)
        empty = tuple(first["loc"]) == ("body",) and first["type"] == "missing"
        # FastAPI reads application/json and any application/...+json as JSON, and a body with
        # no Content-Type as none (a web page may send that to any site: no CSRF through it).
        if not (ctype == "application/json" or _structured_json(ctype) or (not ctype and empty)):
            err = UnsupportedMediaType(
                f"Content-Type {ctype!r} is not supported; send application/json"
                if ctype
                else "a body with no Content-Type: send application/json",
                param="Content-Type",
            )
        elif first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            err = MalformedBody(f"body is not valid JSON ({reason})")
        elif tuple(first["loc"]) == ("body",):  # no config at all, rather than a bad field
            err = MalformedBody(
                "body is empty: send a JSON object ({} for every default)"
                if empty
                else "body must be a JSON object"
            )
        else:
            err = from_validation(exc.errors())
            err.message = in_api_words(err.message)  # a validator's words are the CLI's
        return JSONResponse(err.to_body(), status_code=err.status)

    install_error_shape(app)  # the one error shape, shared with the teacher
    return app


def _structured_json(ctype: str) -> bool:
    """application/merge-patch+json and the like: JSON, as FastAPI reads a body."""
    return ctype.startswith("application/") and ctype.endswith("+json")
