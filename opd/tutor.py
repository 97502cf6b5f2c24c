"""The bundled student's tutor: worked solutions in the task's format with one systematic habit, the
carry out of any column whose total is 10 to `slip_max` dropped (written and passed on as 0).

`opd make-models` trains the student on these and the teacher on the correct ones, so the student's
weakness is a habit the teacher does not share: on the student's own rollouts the teacher flags
exactly the habit's tokens, a signal on-policy distillation can use (bench/results/FINDINGS.md, "A
student with a habit"). A student stopped early on correct solutions was weak in scattered ways
instead, and distillation lowered its accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.task import Problem, column_digits, column_line

SLIP_MAX = 12  # the bundled student's tutor: carries out of totals 10, 11 and 12 dropped


def tutor_solution(operands: tuple[int, ...], slip_max: int = SLIP_MAX) -> tuple[str, int]:
    """(the tutor's worked solution, its answer): the task's format with the habit, and the answer
    read off the digits it wrote."""
    lines, digits, carry = [], [], 0
    for col in range(max(len(str(x)) for x in operands)):
        terms = column_digits(operands, col) + ([carry] if col > 0 else [])
        line, carry = column_line(col, terms)
        if 10 <= sum(terms) <= slip_max:  # the habit: a carry of 1 written and passed on as 0
            line, carry = line[: -len("1\n")] + "0\n", 0
        lines.append(line)
        digits.append(sum(terms) % 10)
    answer = int(str(carry or "") + "".join(str(d) for d in reversed(digits)))
    return "".join(lines) + f"A:{answer}\n", answer


def tutored(items: list[Problem], slip_max: int = SLIP_MAX) -> list[Problem]:
    """The same problems with the tutor's solutions as their targets (answers stay the true sums)."""
    return [TutoredProblem(p.operands, slip_max) for p in items]


def tutor_answered(items: list[Problem], slip_max: int = SLIP_MAX) -> list[Problem]:
    """The same problems scored against the tutor's answers: how faithfully a model learned it."""
    return [TutorAnswered(p.operands, slip_max) for p in items]


@dataclass(frozen=True)
class TutoredProblem(Problem):
    slip_max: int = SLIP_MAX

    @property
    def target(self) -> str:
        return tutor_solution(self.operands, self.slip_max)[0]


@dataclass(frozen=True)
class TutorAnswered(TutoredProblem):
    @property
    def answer(self) -> int:
        return tutor_solution(self.operands, self.slip_max)[1]
