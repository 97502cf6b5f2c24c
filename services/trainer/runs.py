"""The control API's runs: each trains in a thread of its own, reports its events to the API's
event loop (for GET /runs/{id} and its server-sent events) and to Prometheus, and can be stopped at
a step boundary."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from services.trainer.config import MAX_RUNS, RunConfig, in_api_words
from services.trainer.loop import Run, RunError
from shared.errors import InvalidRequest, NotFound, NotReady, QueueFull

# About 300 steps' events (a step, a sample and now and then an evaluation each): some 10 MB, the
# step's per-position KL and the sample's log-probs being a few hundred numbers each.
KEPT_EVENTS = 1000
# Finished runs a server remembers (their views, events and metrics), the oldest forgotten first,
# so a server running sweeps does not grow without end...
KEPT_FINISHED_RUNS = 100
# ...and the events each keeps once a later run has started and nobody follows it (its last ~30
# steps and how it ended; metrics.jsonl has every step): 100 runs of KEPT_EVENTS would be ~1 GB.
KEPT_EVENTS_AFTER = 100
# Of a shutdown's wait, the part left for runs to save once the steps still under way are given up
# on (a step that waits on a hung teacher would outlast the wait, and the process end kill it).
SAVE_RESERVE_S = 30.0
ABANDON_POLL_S = 0.5
JOIN_POLL_S = 0.1


class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.steps = Counter("opd_trainer_steps", "Optimizer steps", ["run"], registry=r)
        self.tokens = Counter("opd_trainer_tokens_generated", "Rollout tokens", ["run"], registry=r)
        self.teacher_tokens = Counter(
            "opd_trainer_teacher_tokens", "Tokens scored by the teacher", ["run"], registry=r
        )
        self.reverse_kl = Gauge(
            "opd_trainer_reverse_kl", "Per-token reverse KL, last step", ["run"], registry=r
        )
        self.horizon = Gauge(
            "opd_trainer_horizon", "Rollout horizon, last step", ["run"], registry=r
        )
        self.accuracy = Gauge(
            "opd_trainer_eval_accuracy", "Held-out accuracy, last eval", ["run"], registry=r
        )
        self.step_seconds = Histogram(
            "opd_trainer_step_seconds",
            "Step wall-clock",
            ["run"],
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
        )

    def observe(self, run_id: str, event: dict) -> None:
        if event["type"] == "step":
            self.steps.labels(run_id).inc()
            self.tokens.labels(run_id).inc(event["tokens_generated"])
            self.teacher_tokens.labels(run_id).inc(event["teacher_tokens"])
            self.reverse_kl.labels(run_id).set(event["reverse_kl"])
            self.horizon.labels(run_id).set(event["horizon"])
            self.step_seconds.labels(run_id).observe(event["step_s"])
        elif event["type"] == "eval":
            self.accuracy.labels(run_id).set(event["accuracy"])

    def forget(self, run_id: str) -> None:
        """Drop the run's series: a forgotten run is no longer exported."""
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase):  # each is labelled by run
                with contextlib.suppress(KeyError):  # a run that never reported this one
                    metric.remove(run_id)


@dataclass
class RunRecord:
    id: str
    config: RunConfig
    # starting (loading the student, waiting for its teachers) | running | completed | stopped | failed
    status: str = "starting"
    error: str | None = None
    summary: dict | None = None
    last_step: dict | None = None
    # The latest events, replayed to a follower that joins late (metrics.jsonl keeps every step):
    # a step's and a sample's events carry a few hundred numbers each, so a long run's would pile up.
    history: deque[dict] = field(default_factory=lambda: deque(maxlen=KEPT_EVENTS))
    published: int = 0  # events published since the run started, kept or not
    stop: threading.Event = field(default_factory=threading.Event)
    # One per open event stream: a shared event that each follower cleared could swallow another's
    # wake-up, and that follower would get the run's last events only at its next keep-alive.
    followers: set[asyncio.Event] = field(default_factory=set)
    thread: threading.Thread | None = None
    run: Run | None = None  # its trainer, once its thread has made it

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "stopped", "failed")

    def publish(self, event: dict) -> None:
        self.history.append(event)
        self.published += 1
        self.wake_followers()

    def keep_fewer_events(self, kept: int) -> None:
        """Forget all but the latest `kept` events (the numbering goes on)."""
        if len(self.history) > kept:
            self.history = deque(
                itertools.islice(self.history, len(self.history) - kept, None), maxlen=KEPT_EVENTS
            )

    def wake_followers(self) -> None:
        for woken in self.followers:
            woken.set()

    def events_after(self, seen: int) -> list[tuple[int, dict]]:
        """(number, event) of the kept events after the first `seen` published, numbered from 1
        in publishing order (a follower that fell behind the kept ones goes on from the oldest
        kept)."""
        first_kept = self.published - len(self.history)
        start = max(0, seen - first_kept)
        return list(
            enumerate(itertools.islice(self.history, start, None), start=first_kept + start + 1)
        )

    def view(self) -> dict:
        return {
            "id": self.id,
            "status": self.status,
            "error": self.error,
            "config": self.config.model_dump(exclude={"api_key"}),
            "last_step": self.last_step,
            "summary": self.summary,
        }


class Runs:
    """Runs of this server; each trains in its own thread and reports events to the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, metrics: TrainerMetrics, max_runs: int = MAX_RUNS
    ):
        self.loop = loop
        self.metrics = metrics
        self.max_runs = max_runs
        self.records: dict[str, RunRecord] = {}
        self._ids = itertools.count(1)
        # In every id: after a restart, a follower reconnecting to its run's events must get a 404,
        # not the events of a new run that took the same number.
        self._server_tag = secrets.token_hex(3)
        self.stopping = False  # set once the server shuts down: no run starts after that
        self._given_up = threading.Event()  # on waiting for them (a second Ctrl-C)

    def writing_to(self, out: str) -> RunRecord | None:
        """The unfinished run that writes into `out`, if any: a second run there, even with
        --overwrite or --resume, would interleave its files with the first one's."""
        folder = Path(out).resolve()
        for record in self.records.values():
            if not record.finished and Path(record.config.out).resolve() == folder:
                return record
        return None

    def unfinished(self) -> list[RunRecord]:
        return [r for r in self.records.values() if not r.finished]

    def refuse_when_full(self) -> None:
        training = len(self.unfinished())
        if training >= self.max_runs:
            raise QueueFull(
                f"{training} runs are training, the most this server takes (--max-runs "
                f"{self.max_runs}); start this one when one of them ends",
                retry_after=60,
            )

    def refuse_other_threads(self, cfg: RunConfig) -> None:
        """torch's thread count is the process's: a run that set one would change it under every
        run training beside it, whether that run set another or trains on the count as it was."""
        if not cfg.threads:
            return
        for record in self.unfinished():
            if record.config.threads != cfg.threads:
                has = record.config.threads
                raise InvalidRequest(
                    f"threads {cfg.threads}: {record.id} trains on this server's torch threads "
                    + (f"set to {has}; give {has}" if has else "as they were; leave threads out")
                    + " while it runs (the count is the process's, shared by its runs)",
                    param="threads",
                )

    def start(self, cfg: RunConfig) -> RunRecord:
        if self.stopping:
            raise NotReady("the trainer is shutting down; start the run on another")
        self.refuse_when_full()
        self.refuse_other_threads(cfg)
        self._forget_old_runs()
        record = RunRecord(id=f"run-{self._server_tag}-{next(self._ids)}", config=cfg)
        self.records[record.id] = record
        record.thread = threading.Thread(
            target=self._train, args=(record,), daemon=True, name=record.id
        )
        record.thread.start()
        return record

    def _forget_old_runs(self) -> None:
        finished = [r for r in self.records.values() if r.finished]  # oldest first
        forgotten = max(0, len(finished) - KEPT_FINISHED_RUNS)
        for record in finished[:forgotten]:
            del self.records[record.id]
            self.metrics.forget(record.id)
        for record in finished[forgotten:]:
            if not record.followers:  # one still reading must not miss the events it is behind
                record.keep_fewer_events(KEPT_EVENTS_AFTER)

    def stop_each(self) -> None:
        """Ask every run to stop at its next step boundary (each writes its checkpoint), and start
        no more."""
        self.stopping = True
        for record in list(self.records.values()):
            record.stop.set()

    def stop_all(self, timeout: float) -> list[str]:
        """Stop every run at its next step boundary and wait for them, up to `timeout` seconds in
        all; a step still under way when SAVE_RESERVE_S (or half the wait) is left is given up
        on, so that its run saves the step before it. Returns the ids of runs still going."""
        self.stop_each()
        deadline = time.monotonic() + timeout
        abandon_at = deadline - min(SAVE_RESERVE_S, timeout / 2)
        self._join_all(abandon_at)
        while self._going() and time.monotonic() < deadline and not self._given_up.is_set():
            for record in self.records.values():
                if record.run is not None:  # again each time: a step may have just begun
                    record.run.abandon_step("the trainer is shutting down")
            self._join_all(min(deadline, time.monotonic() + ABANDON_POLL_S))
        return [r.id for r in self._going()]

    def give_up(self) -> None:
        """Stop waiting for the runs at once (a second Ctrl-C): stop_all returns those still
        going, which lose what they did since their last checkpoint with the process."""
        self._given_up.set()

    def _going(self) -> list[RunRecord]:
        return [r for r in self.records.values() if r.thread is not None and r.thread.is_alive()]

    def _join_all(self, until: float) -> None:
        while self._going() and not self._given_up.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return
            self._going()[0].thread.join(min(left, JOIN_POLL_S))  # looks at _given_up meanwhile

    def get(self, run_id: str) -> RunRecord:
        if run_id not in self.records:
            raise NotFound(
                f"no run {run_id!r} (a server remembers its last {KEPT_FINISHED_RUNS} finished "
                "runs; an older one's files are in its out folder)",
                param="id",
            )
        return self.records[run_id]

    def _train(self, record: RunRecord) -> None:
        def emit(event: dict) -> None:
            self.metrics.observe(record.id, event)
            self.loop.call_soon_threadsafe(self._publish, record, event)

        try:
            record.run = Run(record.config, emit, record.stop)
            summary = record.run.run()
            status = "completed" if summary["completed"] else "stopped"
            self.loop.call_soon_threadsafe(self._finish, record, status, summary, None)
        except Exception as exc:  # reported on the run, never a dead thread with no word
            # A RunError names the setting as the CLI's flag; here it is the field a client sent.
            said = in_api_words(str(exc)) if isinstance(exc, RunError) else exc
            error = f"{type(exc).__name__}: {said}"
            self.loop.call_soon_threadsafe(self._finish, record, "failed", None, error)
        finally:
            record.run = None  # its student and optimizer: a finished run's record outlives them

    def _publish(self, record: RunRecord, event: dict) -> None:
        if event["type"] == "started":
            record.status = "running"
        elif event["type"] == "step":
            record.last_step = {k: v for k, v in event.items() if k != "kl_by_position"}
        record.publish(event)

    def _finish(self, record: RunRecord, status: str, summary: dict | None, error: str | None):
        record.status, record.summary, record.error = status, summary, error
        if error:
            record.publish({"type": "failed", "error": error})
        record.wake_followers()
