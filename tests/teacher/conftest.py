"""Fixtures of the teacher's tests."""

from __future__ import annotations

import pytest

from tests.teacher.test_scoring import mixed_sequences


@pytest.fixture(scope="module")
def seqs(teacher):
    """Six sequences of mixed lengths, for comparing a dialect's numbers with /score's."""
    return mixed_sequences(teacher[1], n=6, seed=11)
