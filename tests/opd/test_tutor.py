"""The bundled student's tutor: the task's format, with exactly one habit."""

from __future__ import annotations

from opd.tutor import SLIP_MAX, tutor_answered, tutor_solution, tutored
from shared.task import Problem, extract_answer, problems


def test_the_tutor_drops_the_carry_out_of_totals_ten_to_slip_max_and_passes_it_on_as_zero():
    # Units 5+6=11 (carry dropped), tens 1+2+0=3: the tutor answers 31, not 41.
    text, answer = tutor_solution((15, 26), slip_max=12)
    assert text == "1:5+6=11>1c0\n2:1+2=3,3+0=3>3c0\nA:31\n"
    assert answer == 31
    # 13 and up keep their carry: 7+6=13.
    assert tutor_solution((17, 26), slip_max=12) == ("1:7+6=13>3c1\n2:1+2=3,3+1=4>4c0\nA:43\n", 43)


def test_a_slip_max_below_ten_is_the_correct_solution():
    for problem in problems("train", 300, seed=2):
        assert tutor_solution(problem.operands, slip_max=9) == (problem.target, problem.answer)


def test_tutored_problems_keep_prompt_answer_and_line_count():
    items = problems("train", 300, seed=1)
    changed = 0
    for problem, taught in zip(items, tutored(items)):
        assert taught.prompt == problem.prompt and taught.answer == problem.answer
        assert taught.target.count("\n") == problem.target.count("\n")
        # Its answer line is the one the tutor's own digits give.
        assert extract_answer(taught.target) == tutor_solution(problem.operands)[1]
        changed += taught.target != problem.target
    # The habit is common but not universal: most problems have a column totalling 10-12.
    assert 0.3 < changed / len(items) < 0.9


def test_tutor_answered_problems_are_scored_against_the_tutors_answers():
    items = problems("eval", 50, seed=0)
    for problem, scored in zip(items, tutor_answered(items, SLIP_MAX)):
        assert isinstance(scored, Problem)
        assert scored.answer == tutor_solution(problem.operands)[1]
        assert scored.target == tutor_solution(problem.operands)[0]
