"""The bundled task: deterministic, disjoint splits, a strict verifier, lengths that make H matter."""

from __future__ import annotations

import random
import statistics

import pytest

from shared.task import (
    ALPHABET,
    LONGEST_PROMPT,
    MAX_NEW_TOKENS,
    Problem,
    extract_answer,
    is_correct,
    problem_stream,
    problems,
    random_problem,
    solution_text,
    split_of,
)


def test_same_seed_same_problems_other_seed_other_problems():
    assert problems("train", 200, seed=7) == problems("train", 200, seed=7)
    assert problems("train", 200, seed=7) != problems("train", 200, seed=8)


def test_a_stream_is_the_problem_list_without_end_and_refuses_a_bad_split_at_once():
    stream = problem_stream("train", seed=7)
    assert [next(stream) for _ in range(300)] == problems("train", 300, seed=7)
    assert len({p.operands for p in problems("train", 5_000, seed=7)}) == 5_000
    with pytest.raises(ValueError, match="split must be one of"):
        problem_stream("dev")


def test_no_prompt_is_longer_than_the_longest_prompt():
    longest = max(len(p.prompt) for p in problems("train", 5_000, seed=0))
    assert longest <= len(LONGEST_PROMPT)
    assert set(LONGEST_PROMPT) <= set(ALPHABET)


def test_train_and_eval_never_overlap():
    train = {p.operands for p in problems("train", 20_000, seed=0)}
    held_out = {p.operands for p in problems("eval", 2_000, seed=0)}
    assert not train & held_out
    assert all(split_of(Problem(ops)) == "eval" for ops in held_out)


def test_solution_adds_column_by_column_with_carries():
    text = solution_text((3518, 962, 47))
    assert text == (
        "1:8+2=10,10+7=17>7c1\n"
        "2:1+6=7,7+4=11,11+1=12>2c1\n"
        "3:5+9=14,14+1=15>5c1\n"
        "4:3+1=4>4c0\n"
        "A:4527\n"
    )


def test_every_solution_ends_in_the_true_sum():
    rng = random.Random(0)
    for _ in range(2000):
        problem = random_problem(rng)
        assert extract_answer(problem.target) == sum(problem.operands)
        assert is_correct(problem, problem.target)


def test_verifier_rejects_wrong_and_garbled_answers():
    problem = Problem((3518, 962, 47))
    right = problem.target
    assert is_correct(problem, right)
    assert not is_correct(problem, right.replace("A:4527", "A:4528"))
    assert not is_correct(problem, right.replace("A:4527", "A:45x7"))
    assert not is_correct(problem, right.replace("A:4527\n", ""))  # no answer line
    assert not is_correct(problem, "A:")
    assert not is_correct(problem, right.replace("A:4527", "A:04527x"))
    assert extract_answer("1:2+3=5>5c0\nA:5") == 5  # cut right after the answer still counts
    # Exactly one way to write the answer, as the last line.
    assert not is_correct(problem, right.replace("A:4527", "A:0004527"))
    assert not is_correct(problem, right.replace("A:4527", "A:\u0664\u0665\u0662\u0667"))
    assert not is_correct(problem, right + "1:7+8=15>5c1\n")  # went on after its answer
    assert not is_correct(problem, right.replace("A:4527", "A:4527 "))
    assert extract_answer("A:1\nA:2\n") == 2 and extract_answer("A:0\n") == 0


def test_reasoning_length_grows_with_difficulty_and_makes_the_horizon_matter():
    items = problems("eval", 500, seed=0)
    lengths = [len(p.target) + 1 for p in items]  # one token per character, plus <eos>
    assert statistics.median(lengths) >= 60
    assert max(lengths) >= 200
    assert max(lengths) <= MAX_NEW_TOKENS
    easy = [n for p, n in zip(items, lengths) if len(p.operands) == 2]
    hard = [n for p, n in zip(items, lengths) if len(p.operands) == 4]
    assert statistics.mean(hard) > statistics.mean(easy) + 30


def test_task_emits_only_alphabet_characters():
    rng = random.Random(1)
    for _ in range(500):
        p = random_problem(rng)
        assert set(p.prompt + p.target) <= set(ALPHABET)
