"""The queue limit both backends share: all of a request's sequences or none, each place freed once."""

from __future__ import annotations

import contextlib

import pytest

from services.teacher import admission as admission_module
from services.teacher.admission import Admission
from services.teacher.backends.base import ScoreJob
from shared.errors import QueueFull


def jobs(*lengths: int) -> list[ScoreJob]:
    return [ScoreJob(input_ids=[1] * n, n_prompt=1) for n in lengths]


def test_a_request_is_admitted_whole_or_refused_whole():
    admission = Admission(max_tokens=100)
    places = admission.admit(jobs(30, 30))
    with pytest.raises(QueueFull, match=r"queue full \(60 tokens waiting, limit 100\)") as info:
        admission.admit(jobs(20, 30))
    assert info.value.retry_after >= 1.0
    assert (admission.tokens, admission.sequences) == (60, 2)  # nothing of the refused one
    for place in places + places:  # released twice: counted once
        place.release()
    assert (admission.tokens, admission.sequences) == (0, 0)


def test_an_empty_queue_admits_a_request_larger_than_the_limit():
    admission = Admission(max_tokens=100)
    admission.admit(jobs(150))
    with pytest.raises(QueueFull):
        admission.admit(jobs(1))


@pytest.mark.parametrize("large", [70, 100, 150])
def test_a_large_request_that_comes_back_is_not_starved_by_small_ones(large):
    """Small requests arriving all the time took each place as it freed: a request as large as the
    queue, which needs it empty, was refused on every try (1,000 of 1,000 in a simulation)."""
    admission = Admission(max_tokens=100)
    queued = [place for _ in range(3) for place in admission.admit(jobs(30))]
    admitted = None
    for _ in range(10):
        try:
            admitted = admission.admit(jobs(large))  # its retry, after each release
            break
        except QueueFull:
            pass
        queued.pop(0).release()  # a batch starts
        with contextlib.suppress(QueueFull):  # another small one, which may not pass it now
            queued += admission.admit(jobs(30))
    assert admitted is not None


def test_the_room_a_refused_request_claims_lapses_when_it_does_not_come_back(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(admission_module.time, "monotonic", lambda: clock[0])
    admission = Admission(max_tokens=100)
    place = admission.admit(jobs(60))[0]
    with pytest.raises(QueueFull) as refused:
        admission.admit(jobs(80))  # claims 80
    place.release()
    with pytest.raises(QueueFull):  # 30 beside the claimed 80 would not fit
        admission.admit(jobs(30))
    clock[0] += refused.value.retry_after + admission_module.CLAIM_SLACK_S
    admission.admit(jobs(30))  # the claim lapsed: the usual rule
