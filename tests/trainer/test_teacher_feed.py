"""The trainer's teacher feed against a real teacher server: closing it leaves nothing running."""

from __future__ import annotations

import asyncio

from services.trainer.teacher_feed import TeacherFeed


def test_close_cancels_a_step_that_was_never_finished(teacher_url):
    feed = TeacherFeed([teacher_url])
    feed.begin(max_positions=8)  # as when generation fails mid-step: finish() is never called
    feed.close()
    assert not feed._thread.is_alive()
    assert not asyncio.all_tasks(feed.loop)  # no task left for the stopped loop to drop
