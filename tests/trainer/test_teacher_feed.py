"""The trainer's teacher feed against a real teacher server: a replica's failure is scored around,
and closing the feed leaves nothing running."""

from __future__ import annotations

import asyncio

from opd.bundled import TEACHER_PATH
from services.teacher.app import create_app
from services.teacher.settings import TeacherSettings
from services.trainer.rollout import Rollout
from services.trainer.teacher_feed import TeacherFeed
from shared.task import problems
from tests.conftest import serve
from tests.teacher.test_stream import CrashingBackend


def test_close_cancels_a_step_that_was_never_finished(teacher_url):
    feed = TeacherFeed([teacher_url])
    feed.begin(max_positions=8)  # as when generation fails mid-step: finish() is never called
    feed.close()
    assert not feed._thread.is_alive()
    assert not asyncio.all_tasks(feed.loop)  # no task left for the stopped loop to drop


def rollouts(n: int) -> list[Rollout]:
    problem = problems("train", 1, seed=0)[0]
    return [Rollout(k, problem, [1, 21, 18], [5, 6, 7], [0.0] * 3, True) for k in range(n)]


def test_a_replica_whose_forward_fails_mid_step_is_scored_around():
    backend = CrashingBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app) as url:
        feed = TeacherFeed([url])
        try:
            backend.crash_next = True  # the first frame's forward fails, as on a CUDA OOM
            step = feed.begin(max_positions=8)
            step.put(rollouts(4))
            scores, stats = step.finish()
        finally:
            feed.close()
    assert sorted(scores) == [0, 1, 2, 3] and stats.rescored == 4
    assert all(len(score.logprobs) == 3 for score in scores.values())
