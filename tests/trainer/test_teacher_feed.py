"""The trainer's teacher feed against a real teacher server: scored micro-batches come back in the
order they were put, a replica's failure is scored around, and closing the feed leaves nothing
running, and a teacher that falls behind holds up the generating thread (backpressure)."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import pytest

from opd.bundled import TEACHER_PATH
from services.teacher.app import create_app
from services.teacher.backends.hf import HFBackend
from services.teacher.settings import TeacherSettings
from services.trainer.rollout import Rollout
from services.trainer.teacher_feed import TeacherFeed, TeacherStreamError, _Lane, stalled_frames
from shared.client import TeacherTimedOut
from shared.errors import FingerprintMismatch, ServerError
from shared.task import problems
from tests.conftest import (
    a_closed_port,
    metric,
    plain_http,
    round_robin_balancer,
    serve,
    teacher_with_another_tokenizer,
    wait_for,
)
from tests.teacher.test_routes import GatedBackend
from tests.teacher.test_routes_stream import CrashingBackend, PoisonedBackend, scored_tokens


def test_close_cancels_a_step_that_was_never_finished(teacher_url):
    feed = TeacherFeed([teacher_url])
    feed.begin(max_positions=8)  # as when generation fails mid-step: finish() is never called
    feed.close()
    assert feed.loop.is_closed()  # its thread ended
    assert not asyncio.all_tasks(feed.loop)  # no task left for the stopped loop to drop


def rollouts(n: int, first_key: int = 0) -> list[Rollout]:
    problem = problems("train", 1, seed=0)[0]
    return [
        Rollout(k, problem, [1, 21, 18], [5, 6, 7], [0.0] * 3, True)
        for k in range(first_key, first_key + n)
    ]


def finished_within(step, seconds: float) -> dict:
    """The step's scored frames and its finish(), trained on in a thread that must end in time."""
    result: dict = {}

    def train():
        result["got"] = list(step.scored_frames())
        result["scores"], result["stats"] = step.finish()

    trainer = threading.Thread(target=train)
    trainer.start()
    trainer.join(timeout=seconds)
    assert not trainer.is_alive()
    return result


def test_scored_frames_come_in_the_order_put_each_with_its_own_scores(teacher_url):
    feed = TeacherFeed([teacher_url])
    try:
        step = feed.begin(max_positions=8)
        frames = [rollouts(3, 0), rollouts(1, 3), rollouts(2, 4)]
        for frame in frames:
            step.put(frame)
        got = list(step.scored_frames())
        scores, stats = step.finish()
    finally:
        feed.close()
    assert [[r.key for r in f] for f, _ in got] == [[r.key for r in f] for f in frames]
    assert all(sorted(s) == [r.key for r in f] for f, s in got)  # each frame's scores, no others
    assert sorted(scores) == list(range(6)) and stats.scored_tokens == 18
    assert stats.wait_s > 0


def test_streams_per_url_spread_a_step_over_the_replicas_behind_one_balanced_url(teacher_url):
    """A balancer keeps each stream on one replica: with one stream per URL a step's frames all go
    to one replica, with two the step is shared."""
    second = create_app(TeacherSettings(model=str(TEACHER_PATH)))
    with serve(second) as second_url, round_robin_balancer([teacher_url, second_url]) as pool:
        for streams, replicas_used in ((1, 1), (2, 2)):
            before = [scored_tokens(u) for u in (teacher_url, second_url)]
            feed = TeacherFeed([pool], streams_per_url=streams)
            try:
                step = feed.begin(max_positions=8)
                for frame in range(4):
                    step.put(rollouts(2, 2 * frame))
                scores, stats = step.finish()
            finally:
                feed.close()
            gained = [scored_tokens(u) - b for u, b in zip((teacher_url, second_url), before)]
            assert sorted(scores) == list(range(8)) and stats.rescored == 0
            assert sum(gained) == stats.scored_tokens == 24
            assert sum(g > 0 for g in gained) == replicas_used, (streams, gained)


def test_a_replica_that_answers_the_steps_stream_is_forgiven_its_earlier_failures(teacher_url):
    """The trainer's only traffic is streams: one that scores must bring a replica back to the
    first sit-out span, or a blip hours later would bench it for a minute."""
    feed = TeacherFeed([teacher_url])
    replicas = feed.client._core.replicas
    try:
        replicas.failures[teacher_url] = 3  # as after three failures in a row, now over
        step = feed.begin(max_positions=8)
        step.put(rollouts(2))
        list(step.scored_frames())
        step.finish()
    finally:
        feed.close()
    assert replicas.failures[teacher_url] == 0


def test_a_replica_whose_forwards_fail_mid_step_is_scored_around(teacher_url):
    backend = CrashingBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app) as broken_url:
        feed = TeacherFeed([broken_url, teacher_url])
        try:
            backend.crashes = 10**9  # every forward fails, as on a GPU in a bad state
            step = feed.begin(max_positions=8)
            frames = [rollouts(4, 0), rollouts(2, 4)]
            for frame in frames:  # the first goes to the broken replica, the second to the good one
                step.put(frame)
            got = list(step.scored_frames())
            scores, stats = step.finish()
        finally:
            feed.close()
    assert sorted(scores) == list(range(6)) and stats.rescored == 4
    assert all(len(score.logprobs) == 3 for score in scores.values())
    # The rescored frame is yielded once, whole, in its place.
    assert [sorted(s) for _, s in got] == [[0, 1, 2, 3], [4, 5]]


def test_a_rollout_one_replica_cannot_score_is_scored_elsewhere_and_only_it(teacher_url):
    backend = PoisonedBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app) as poisoned_url:
        feed = TeacherFeed([poisoned_url, teacher_url])
        try:
            step = feed.begin(max_positions=8)
            frame = rollouts(4)
            frame[2].completion_ids = [5, PoisonedBackend.POISON, 7]
            step.put(frame)  # to the poisoned replica: both are idle, and it comes first
            got = list(step.scored_frames())
            scores, stats = step.finish()
        finally:
            feed.close()
    # Its three siblings came on the stream; only the one that failed was scored again.
    assert sorted(scores) == [0, 1, 2, 3] and stats.rescored == 1
    assert [sorted(s) for _, s in got] == [[0, 1, 2, 3]]
    assert stats.scored_tokens == 12  # each rollout's three tokens once, nothing scored twice


def test_a_dead_replicas_frames_are_scored_elsewhere_at_once_not_at_the_steps_end(teacher_url):
    """The student trains on each frame as soon as it is scored: one sent to a replica that is gone
    must not wait for the last frame of the step to be put."""
    dead = f"http://127.0.0.1:{a_closed_port()}"
    feed = TeacherFeed([dead, teacher_url])
    try:
        step = feed.begin(max_positions=8)
        step.put(rollouts(2, 0))  # to the dead replica: both are idle, and it comes first
        deadline = time.monotonic() + 30
        while not step._frame_ready(0) and time.monotonic() < deadline:
            time.sleep(0.05)
        ready_before_the_end = step._frame_ready(0)
        step.put(rollouts(2, 2))
        got = list(step.scored_frames())
        scores, stats = step.finish()
    finally:
        feed.close()
    assert ready_before_the_end
    assert [sorted(s) for _, s in got] == [[0, 1], [2, 3]] and stats.rescored == 2


def test_put_blocks_while_the_teacher_is_behind(teacher_url):
    backend = GatedBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    put: list[int] = []
    with serve(app) as slow_url:
        feed = TeacherFeed([slow_url], frames_in_flight=1)
        try:
            step = feed.begin(max_positions=8)

            def generate():
                for key in range(4):
                    step.put(rollouts(1, key))
                    put.append(key)

            producer = threading.Thread(target=generate)
            producer.start()
            deadline = time.monotonic() + 30
            while len(put) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)  # time enough for a third put, were it not held up
            # One frame awaits its score and one waits to be sent; the third put waits for room.
            assert put == [0, 1]
            backend.gate.set()
            producer.join(timeout=30)
            got = list(step.scored_frames())
            scores, stats = step.finish()
        finally:
            backend.gate.set()
            feed.close()
    assert put == [0, 1, 2, 3] and [[r.key for r in f] for f, _ in got] == [[0], [1], [2], [3]]
    assert sorted(scores) == [0, 1, 2, 3] and stats.put_wait_s >= 0.5


def test_a_teacher_that_sends_nothing_back_fails_the_step_instead_of_hanging_it():
    backend = GatedBackend(str(TEACHER_PATH))  # never opened: as a proxy that buffers the body
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app) as stuck_url:
        feed = TeacherFeed([stuck_url], frames_in_flight=1, timeout=1.0)
        try:
            step = feed.begin(max_positions=8)
            put = []
            with pytest.raises(TeacherTimedOut, match="no score came back in 1 s"):
                for key in range(4):  # the third put would wait for room forever
                    step.put(rollouts(1, key))
                    put.append(key)
            assert put == [0, 1]  # the put that waited is the one that raises
        finally:
            backend.gate.set()
            feed.close()


def test_a_refused_frame_fails_the_step_at_once_saying_why(teacher_url):
    feed = TeacherFeed([teacher_url], frames_in_flight=1, timeout=30.0)
    try:
        step = feed.begin(max_positions=8)
        bad = rollouts(1, 0)
        bad[0].completion_ids = [10**6]  # no such token: the teacher refuses the frame
        started = time.monotonic()
        with pytest.raises(TeacherStreamError, match=f"teacher at {teacher_url} refused frame 0"):
            for key in range(6):
                step.put(bad if key == 0 else rollouts(1, key))
            list(step.scored_frames())
        assert time.monotonic() - started < 10  # not after the 30 s stall timeout
        with pytest.raises(TeacherStreamError):  # put() after the failure raises too
            step.put(rollouts(1, 9))
    finally:
        feed.close()


def test_a_refused_last_frame_fails_the_step_by_name(teacher_url):
    """Refused after the last put, when nothing else is in flight: still the refusal, by name,
    not whatever scoring the frame again elsewhere would say."""
    feed = TeacherFeed([teacher_url], frames_in_flight=4, timeout=30.0)
    try:
        step = feed.begin(max_positions=8)
        bad = rollouts(1, 2)
        bad[0].completion_ids = [10**6]  # no such token: the teacher refuses the frame
        step.put(rollouts(2, 0))
        step.put(bad)
        time.sleep(1.0)  # the refusal comes back while the feed still waits for more frames
        with pytest.raises(TeacherStreamError, match=f"teacher at {teacher_url} refused frame 1"):
            list(step.scored_frames())
    finally:
        feed.close()


def test_a_replica_with_another_tokenizer_behind_the_balancer_fails_the_step_unscored(
    teacher_url, teacher, tmp_path
):
    """connect() met the bundled teacher; the step's stream reaches another replica, whose
    tokenizer is not the student's: the step fails by name, and none of its scores is taken."""
    other = create_app(TeacherSettings(model=str(teacher_with_another_tokenizer(tmp_path / "t"))))
    with serve(other) as other_url, round_robin_balancer([teacher_url, other_url]) as pool:
        feed = TeacherFeed([pool], timeout=30.0)
        try:
            feed.call(feed.client.connect(teacher[1], wait_s=0))
            step = feed.begin(max_positions=8)
            with pytest.raises(FingerprintMismatch, match=f"teacher at {pool} answered with"):
                step.put(rollouts(2, 0))
                list(step.scored_frames())
            assert not step.scores
        finally:
            feed.close()


def test_a_lane_is_stalled_only_while_it_answers_nothing_and_another_lane_answers():
    lane = _Lane("http://a")
    lane.open = {0: 1, 1: 1}
    sent_at = {0: 0.0, 1: 5.0}
    silent = stalled_frames(lane, others_answered_at=20.0, sent_at=sent_at, now=20.0)
    assert silent == [0, 1]  # nothing from it since either was sent, another lane answered
    assert stalled_frames(lane, others_answered_at=20.0, sent_at=sent_at, now=14.0) == [0]
    assert stalled_frames(lane, others_answered_at=-1.0, sent_at=sent_at, now=20.0) == []
    lane.answered_at = 12.0  # it answered after both were sent: alive, the frames only queued
    assert stalled_frames(lane, others_answered_at=20.0, sent_at=sent_at, now=20.0) == []
    # ... until it has said nothing for HEDGE_AFTER_S since, while another lane answered: it may
    # have hung mid-frame.
    assert stalled_frames(lane, others_answered_at=20.0, sent_at=sent_at, now=23.0) == [0, 1]
    assert stalled_frames(lane, others_answered_at=11.0, sent_at=sent_at, now=23.0) == []


class HangsOnPoison(HFBackend):
    """The real hf backend, hanging on a batch that holds the POISON token, as a GPU that stops
    mid-frame would (the frame's other sequences, in batches before it, are answered)."""

    POISON = 13

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.release = threading.Event()

    def score_batch(self, jobs):
        if any(self.POISON in job.input_ids for job in jobs):
            self.release.wait(60)
        return super().score_batch(jobs)


def test_a_replica_that_hangs_mid_frame_is_scored_around(teacher_url, monkeypatch):
    monkeypatch.setattr("services.trainer.teacher_feed.HEDGE_AFTER_S", 0.5)
    settings = TeacherSettings(model=str(TEACHER_PATH), max_batch_tokens=8)  # a sequence a batch
    backend = HangsOnPoison(str(TEACHER_PATH), max_batch_tokens=8)
    with serve(create_app(settings, backend=backend)) as hangs_url:
        feed = TeacherFeed([hangs_url, teacher_url], timeout=300)
        try:
            step = feed.begin(max_positions=8)
            frame = rollouts(2, 0)
            frame[1].completion_ids = [5, HangsOnPoison.POISON, 7]
            step.put(frame)  # to the first replica: it answers rollout 0, then hangs
            wait_for(lambda: metric(hangs_url, "opd_teacher_tokens_scored_total") == 3)
            step.put(rollouts(2, 2))  # to the other, which answers after that
            result = finished_within(step, 60)  # not held for the client's 300 s
        finally:
            backend.release.set()
            feed.close()
    assert [sorted(s) for _, s in result["got"]] == [[0, 1], [2, 3]]
    assert result["stats"].rescored == 1  # only the rollout it never answered


def test_a_replica_that_hangs_is_scored_around_without_waiting_for_the_client_timeout(
    teacher_url, monkeypatch
):
    """A replica that takes the stream and never answers (a hung GPU) would hold each step for the
    client's timeout, minutes: its frames go elsewhere once others have answered, and the step ends
    when every rollout is scored, without waiting for the silent stream."""
    monkeypatch.setattr("services.trainer.teacher_feed.HEDGE_AFTER_S", 0.5)
    release = threading.Event()

    class Hangs(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            release.wait(60)

    with plain_http(Hangs) as hung:
        feed = TeacherFeed([hung, teacher_url], timeout=300)
        try:
            step = feed.begin(max_positions=8)
            for first in range(0, 8, 2):
                step.put(rollouts(2, first))
            result = finished_within(step, 60)  # not held for the client's 300 s
        finally:
            release.set()
            feed.close()
    assert [sorted(s) for _, s in result["got"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sorted(result["scores"]) == list(range(8)) and result["stats"].rescored >= 2


def test_a_hung_replica_behind_a_balancer_that_gets_a_rescue_too_does_not_fail_the_step(
    monkeypatch,
):
    """The stalled lane's frame is scored again through the same balanced URL, which may hand
    it to the hung replica again: that rescue's timeout failed the step, though a healthy replica
    was there. It is tried once more at the step's end instead."""
    monkeypatch.setattr("services.trainer.teacher_feed.HEDGE_AFTER_S", 0.5)
    release = threading.Event()

    class Hangs(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            release.wait(60)

    good = create_app(TeacherSettings(model=str(TEACHER_PATH)))
    with plain_http(Hangs) as hung, serve(good) as up, round_robin_balancer([hung, up]) as pool:
        feed = TeacherFeed([pool], streams_per_url=2, timeout=5)
        try:
            step = feed.begin(max_positions=8)
            for first in range(0, 8, 2):
                step.put(rollouts(2, first))
            result = finished_within(step, 60)
        finally:
            release.set()
            feed.close()
    assert sorted(result["scores"]) == list(range(8))


def test_a_rollout_no_replica_can_score_fails_the_step_with_its_error_at_once():
    """Its rescue failing too, its frame stayed open on a healthy stream and held generation
    back, till the step failed after the client's timeout blaming a proxy."""
    backend = PoisonedBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app) as url:
        feed = TeacherFeed([url], frames_in_flight=1, timeout=60)
        try:
            step = feed.begin(max_positions=8)
            started = time.monotonic()
            with pytest.raises(ServerError, match="internal error"):
                for first in range(0, 8, 2):
                    frame = rollouts(2, first)
                    if first == 0:
                        frame[1].completion_ids = [5, PoisonedBackend.POISON, 7]
                    step.put(frame)
                list(step.scored_frames())
            assert time.monotonic() - started < 30  # not the client's 60 s
        finally:
            feed.close()


def test_a_second_answer_for_a_rollout_counts_as_teacher_work_but_does_not_train(
    teacher_url, monkeypatch
):
    """A stalled replica's frame is scored elsewhere too; when the stalled one answers after all,
    its score is work the teacher did (teacher tokens and time count it), not a second score."""
    monkeypatch.setattr("services.trainer.teacher_feed.HEDGE_AFTER_S", 0.5)
    backend = GatedBackend(str(TEACHER_PATH))
    with serve(create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)) as slow:
        feed = TeacherFeed([slow, teacher_url], timeout=60)
        try:
            step = feed.begin(max_positions=8)
            step.put(rollouts(2, 0))
            step.put(rollouts(2, 2))  # one frame each way
            wait_for(lambda: len(step.scores) == 4 and step.stats.rescored == 2)
            first_scores = dict(step.scores)
            backend.gate.set()  # the stalled replica answers its frame after all
            wait_for(lambda: step.stats.scored_tokens == 18)  # 4 rollouts x 3 tokens, + 2 x 3
            got = list(step.scored_frames())
            scores, stats = step.finish()
        finally:
            backend.gate.set()
            feed.close()
    assert [sorted(s) for _, s in got] == [[0, 1], [2, 3]]
    assert all(scores[k] is first_scores[k] for k in range(4))  # the first score trains
    assert stats.scored_tokens == 18 and stats.rescored == 2


@pytest.mark.parametrize("rescue_lands", [False, True])
def test_a_slow_rescue_is_not_waited_for_once_its_frame_is_answered(monkeypatch, rescue_lands):
    """A stalled replica's frame goes to another replica, which is slow to take it; when the
    stalled one answers after all, the step ends without waiting out the slow rescue (whose
    timeout would have failed it). A rescue that lands before the step ends was a second scoring
    all the same: it counts as rescored."""
    hedge_after = "services.trainer.teacher_feed.HEDGE_AFTER_S"
    monkeypatch.setattr(hedge_after, 60.0)  # no rescue before b is made slow
    stalled, slow = GatedBackend(str(TEACHER_PATH)), GatedBackend(str(TEACHER_PATH))
    slow.gate.set()  # it answers its own frame at once, then holds what comes next
    settings = TeacherSettings(model=str(TEACHER_PATH))
    with (
        serve(create_app(settings, backend=stalled)) as a,
        serve(create_app(settings, backend=slow)) as b,
    ):
        feed = TeacherFeed([a, b], timeout=60)
        try:
            step = feed.begin(max_positions=8)
            step.put(rollouts(2, 0))
            step.put(rollouts(2, 2))  # one frame each way
            wait_for(lambda: len(step.scores) == 2)  # b answered its frame
            slow.gate.clear()
            slow.running.clear()
            monkeypatch.setattr(hedge_after, 0.5)  # the watcher reads it at each look
            wait_for(slow.running.is_set)  # the rescue of a's frame waits at b's gate
            stalled.gate.set()  # a answers its frame after all
            if rescue_lands:
                wait_for(lambda: len(step.scores) == 4)
                slow.gate.set()
                wait_for(lambda: step.stats.rescored == 2)
            started = time.monotonic()
            list(step.scored_frames())
            scores, stats = step.finish()
            assert time.monotonic() - started < 10  # not the rescue's 60 s
        finally:
            stalled.gate.set()
            slow.gate.set()
            feed.close()
    assert sorted(scores) == [0, 1, 2, 3] and stats.rescored == (2 if rescue_lands else 0)
