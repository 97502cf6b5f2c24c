"""The queue limit both backends share: all of a request's sequences or none, each place freed once."""

from __future__ import annotations

import pytest

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
