"""Evaluation: greedy accuracy, and avg@k sampled at a temperature, even for k = 1."""

from __future__ import annotations

from opd.evaluate import evaluate
from shared.task import problems

PROBLEMS = problems("eval", 32, seed=0)


def test_one_sample_at_temperature_one_is_sampled_not_the_greedy_completion(student):
    greedy = evaluate(*student, PROBLEMS, progress=False)
    sampled = evaluate(*student, PROBLEMS, samples=1, temperature=1.0, progress=False)
    twice = evaluate(*student, PROBLEMS, samples=2, temperature=1.0, progress=False)
    assert sampled.mean_tokens != greedy.mean_tokens  # another completion for some problem
    assert sampled.samples == 1 and twice.samples == 2
    again = evaluate(*student, PROBLEMS, samples=1, temperature=1.0, progress=False)
    same = ("accuracy", "mean_tokens", "well_formed")
    assert [getattr(again, f) for f in same] == [getattr(sampled, f) for f in same]  # by the seed
