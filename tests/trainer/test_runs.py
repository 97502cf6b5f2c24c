"""The trainer server's registry of runs, without HTTP."""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import generate_latest

from opd.bundled import TEACHER_PATH
from services.teacher.app import create_app
from services.teacher.settings import TeacherSettings
from services.trainer import checkpoint
from services.trainer import runs as runs_module
from services.trainer.api import TrainerServer
from services.trainer.api import create_app as trainer_app
from services.trainer.config import RunConfig
from services.trainer.report import read_jsonl
from services.trainer.runs import (
    KEPT_EVENTS,
    KEPT_EVENTS_AFTER,
    RunRecord,
    Runs,
    TrainerMetrics,
)
from shared.errors import InvalidRequest, NotReady, QueueFull
from tests.conftest import a_closed_port, serve, wait_for
from tests.teacher.test_routes import HangingBackend
from tests.trainer.test_loop import SMALL


def test_no_run_starts_once_the_server_is_shutting_down(tmp_path):
    """A POST /runs answered after the shutdown signal would start a run that nobody stops."""
    loop = asyncio.new_event_loop()
    try:
        runs = Runs(loop, TrainerMetrics())
        runs.stop_each()
        with pytest.raises(NotReady, match="shutting down"):
            runs.start(RunConfig(out=str(tmp_path / "run")))
        assert runs.records == {}
    finally:
        loop.close()


def test_a_run_keeps_its_latest_events_and_a_late_follower_goes_on_from_the_oldest_kept():
    record = RunRecord(id="run-1", config=RunConfig())
    for step in range(KEPT_EVENTS + 5):
        record.publish({"type": "step", "step": step})
    assert len(record.history) == KEPT_EVENTS and record.published == KEPT_EVENTS + 5
    assert record.events_after(0)[0] == (6, {"type": "step", "step": 5})  # five no longer kept
    assert [(n, e["step"]) for n, e in record.events_after(KEPT_EVENTS + 3)] == [
        (KEPT_EVENTS + 4, KEPT_EVENTS + 3),
        (KEPT_EVENTS + 5, KEPT_EVENTS + 4),
    ]
    assert record.events_after(record.published) == []


def test_a_server_forgets_its_oldest_finished_runs_and_their_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(runs_module, "KEPT_FINISHED_RUNS", 2)
    loop = asyncio.new_event_loop()
    try:
        runs = Runs(loop, TrainerMetrics())
        for n, status in enumerate(["completed", "running", "failed", "stopped"]):
            record = RunRecord(id=f"old-{n}", config=RunConfig(), status=status)
            runs.records[record.id] = record
            runs.metrics.observe(record.id, {"type": "eval", "accuracy": 0.5})
        closed = f"http://127.0.0.1:{a_closed_port()}"
        new = runs.start(RunConfig(out=str(tmp_path / "run"), teacher_url=[closed]))
        new.thread.join(timeout=60)  # it fails at once: no teacher there
        # The oldest finished one is forgotten; a running one never is.
        assert list(runs.records) == ["old-1", "old-2", "old-3", new.id]
        exported = generate_latest(runs.metrics.registry).decode()
        assert 'run="old-0"' not in exported and 'run="old-2"' in exported
    finally:
        loop.close()


def test_finished_runs_keep_fewer_events_once_another_starts_unless_followed(tmp_path):
    """A long-lived server's finished runs would otherwise hold ~10 MB of events each."""
    loop = asyncio.new_event_loop()
    try:
        runs = Runs(loop, TrainerMetrics())
        for name in ("followed", "alone"):
            record = runs.records[name] = RunRecord(id=name, config=RunConfig(), status="completed")
            for step in range(KEPT_EVENTS + 5):
                record.publish({"type": "step", "step": step})
        runs.records["followed"].followers.add(asyncio.Event())
        closed = f"http://127.0.0.1:{a_closed_port()}"
        new = runs.start(RunConfig(out=str(tmp_path / "run"), teacher_url=[closed]))
        new.thread.join(timeout=60)
        assert len(runs.records["followed"].history) == KEPT_EVENTS
        alone = runs.records["alone"]
        assert len(alone.history) == KEPT_EVENTS_AFTER
        # The numbering goes on: a late follower starts at the oldest kept, with its number.
        first = KEPT_EVENTS + 5 - KEPT_EVENTS_AFTER
        assert alone.events_after(0)[0] == (first + 1, {"type": "step", "step": first})
        alone.publish({"type": "done"})
        assert len(alone.history) == KEPT_EVENTS_AFTER + 1  # bounded by KEPT_EVENTS still
        assert alone.events_after(KEPT_EVENTS + 5) == [(KEPT_EVENTS + 6, {"type": "done"})]
    finally:
        loop.close()


def test_a_second_ctrl_c_gives_up_waiting_for_the_runs_at_once(tmp_path):
    """uvicorn's second Ctrl-C ends only its own wait for connections: the server still waited
    for its runs, up to 2 minutes on a step that a hung teacher holds."""
    backend = HangingBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    loop = asyncio.new_event_loop()
    try:
        with serve(app) as url, ThreadPoolExecutor(1) as pool:
            runs = Runs(loop, TrainerMetrics())
            out = tmp_path / "run"
            record = runs.start(RunConfig(**SMALL, teacher_url=[url], steps=500, out=str(out)))
            wait_for(lambda: len(read_jsonl(out / "metrics.jsonl")) >= 1, timeout=120)
            backend.hang.set()
            wait_for(backend.hanging.is_set, timeout=60)
            try:
                waiting = pool.submit(runs.stop_all, 100)
                time.sleep(0.5)
                assert not waiting.done()
                runs.give_up()
                assert waiting.result(timeout=5) == [record.id]
            finally:
                backend.release.set()
                record.thread.join(timeout=120)
    finally:
        loop.close()


def test_the_servers_second_ctrl_c_gives_up_on_its_runs_a_first_or_sigterm_does_not():
    for signals, gives_up in [
        ([signal.SIGINT], False),
        ([signal.SIGTERM, signal.SIGTERM], False),
        ([signal.SIGINT, signal.SIGINT], True),
    ]:
        app = trainer_app()
        app.state.runs = Runs(asyncio.new_event_loop(), TrainerMetrics())
        server = TrainerServer(app, "127.0.0.1", 0)
        for sig in signals:
            server.handle_exit(sig, None)
        assert app.state.runs._given_up.is_set() == gives_up, signals
        app.state.runs.loop.close()


def with_runs(test, **kwargs):
    loop = asyncio.new_event_loop()
    try:
        return test(Runs(loop, TrainerMetrics(), **kwargs))
    finally:
        loop.close()


def test_run_ids_differ_between_servers(tmp_path):
    """A follower reconnecting after a restart must not get another run's events under its id."""
    closed = [f"http://127.0.0.1:{a_closed_port()}"]

    def first_id(runs: Runs) -> str:
        record = runs.start(RunConfig(out=str(tmp_path / "run"), teacher_url=closed))
        record.thread.join(timeout=60)
        return record.id

    ids = {with_runs(first_id) for _ in range(3)}
    assert len(ids) == 3 and all(i.startswith("run-") and i.endswith("-1") for i in ids)


def test_a_run_is_starting_until_it_says_it_has_started():
    def check(runs: Runs) -> None:
        record = RunRecord(id="run-1", config=RunConfig())
        assert record.status == "starting"
        runs._publish(record, {"type": "started", "step": 0, "resumed": False})
        assert record.status == "running" and record.published == 1

    with_runs(check)


def test_a_full_server_refuses_a_run_with_a_429_and_a_retry_after(tmp_path):
    def check(runs: Runs) -> None:
        runs.records["busy"] = RunRecord(id="busy", config=RunConfig(), status="running")
        runs.records["old"] = RunRecord(id="old", config=RunConfig(), status="completed")
        with pytest.raises(QueueFull, match="--max-runs 1") as refused:
            runs.start(RunConfig(out=str(tmp_path / "run")))
        assert refused.value.retry_after and list(runs.records) == ["busy", "old"]

    with_runs(check, max_runs=1)


def test_a_run_may_not_change_the_thread_count_of_the_runs_it_shares_the_process_with():
    def check(runs: Runs) -> None:
        runs.records["busy"] = RunRecord(id="busy", config=RunConfig(threads=2), status="running")
        with pytest.raises(InvalidRequest, match="set to 2; give 2") as refused:
            runs.refuse_other_threads(RunConfig(threads=1))
        assert refused.value.param == "threads"
        runs.refuse_other_threads(RunConfig(threads=2))  # the same, or none, is fine
        runs.refuse_other_threads(RunConfig())
        runs.records["busy"].config = RunConfig()  # one that trains on the count as it was
        with pytest.raises(InvalidRequest, match="as they were; leave threads out"):
            runs.refuse_other_threads(RunConfig(threads=1))
        runs.records["busy"].status = "completed"  # an ended run holds none
        runs.refuse_other_threads(RunConfig(threads=1))

    with_runs(check)


def test_a_shutdown_gives_up_on_a_step_that_outlasts_its_wait_and_keeps_the_steps_before_it(
    tmp_path,
):
    """No periodic checkpoints, and a teacher that hangs mid-run: the step under way would wait
    for the client's timeout (minutes) and the process end kill the run with all its steps. It
    is given up on instead, and the run saves the step before it."""
    backend = HangingBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    out = tmp_path / "run"
    loop = asyncio.new_event_loop()
    try:
        with serve(app) as url:
            runs = Runs(loop, TrainerMetrics())
            record = runs.start(RunConfig(**SMALL, teacher_url=[url], steps=500, out=str(out)))
            wait_for(lambda: len(read_jsonl(out / "metrics.jsonl")) >= 2, timeout=120)
            backend.hang.set()
            wait_for(backend.hanging.is_set, timeout=60)
            try:
                assert runs.stop_all(timeout=4) == []
            finally:
                backend.release.set()
        loop.run_until_complete(asyncio.sleep(0))  # the run's last events, as the server's loop
        steps = len(read_jsonl(out / "metrics.jsonl"))
        assert steps >= 2 and checkpoint.latest(out).name == checkpoint.step_name(steps)
        assert record.status == "stopped" and record.summary["steps"] == steps
        assert record.run is None  # a finished run's record keeps no student
    finally:
        loop.close()
