"""The hf backend's limits: the longest sequence it serves never exceeds the model's positions."""

from __future__ import annotations

import pytest

from opd.bundled import TEACHER_PATH
from services.teacher.backends.hf import HFBackend


@pytest.mark.parametrize("asked, served", [(None, 512), (300, 300), (4096, 512)])
def test_max_seq_len_is_capped_by_the_models_positions(asked, served):
    # models/tiny-teacher has 512 positions; the default max_batch_tokens is larger.
    assert HFBackend(str(TEACHER_PATH), max_seq_len=asked).load().max_seq_len == served
