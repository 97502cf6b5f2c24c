"""The bundled task: multi-operand addition solved column by column, with a written chain of thought.

A problem is 2-4 operands of 2-6 digits. The target walks the columns from the right; each column line
adds that column's digits (and the carry) as a chain of two-term sums, then writes the digit and the
carry. The last line gives the answer, which the verifier extracts and compares exactly:

    prompt:  "Q:3518+962+47\n"
    target:  "1:8+2=10,10+7=17>7c1\n"
             "2:1+6=7,7+4=11,11+1=12>2c1\n"
             "3:5+9=14,14+1=15>5c1\n"
             "4:3+1=4>4c0\n"
             "A:4527\n"

Harder problems (more operands, more digits) have longer chains, so the rollout horizon matters.
Train and eval problems never overlap: each problem goes to one split by a hash of its text.

    opd task --n 5 --split eval     # print a few problems (opd/cli.py)
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

MIN_OPERANDS, MAX_OPERANDS = 2, 4
MIN_DIGITS, MAX_DIGITS = 2, 6
SPLITS = ("train", "eval")
# The eval split takes 1/8 of the hash space; the rest is train.
EVAL_BUCKETS = 1
HASH_BUCKETS = 8
# Every character the task can emit; the tokenizer is built from this alphabet.
ALPHABET = "0123456789+=,>:cAQ\n"
# The longest prompt the task can pose: the most operands, each of the most digits.
LONGEST_PROMPT = "Q:" + "+".join(["9" * MAX_DIGITS] * MAX_OPERANDS) + "\n"
# Room for the longest possible target (4 operands of 6 digits: 224 characters and <eos>); evaluation
# always generates this far, so it is never truncated, and it is the full rollout horizon H_max.
MAX_NEW_TOKENS = 256

# ASCII digits (\d takes any script's) and no leading zero: the answer is written one way only.
_ANSWER_RE = re.compile(r"A:(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "Q:" + "+".join(str(x) for x in self.operands) + "\n"

    @property
    def answer(self) -> int:
        return sum(self.operands)

    @property
    def target(self) -> str:
        return solution_text(self.operands)


def solution_text(operands: tuple[int, ...]) -> str:
    """The step-by-step chain of thought for adding `operands`, ending in the answer line."""
    lines = []
    carry = 0
    for col in range(max(len(str(x)) for x in operands)):
        # The carry joins the chain as its last term from the second column on, even when it is 0,
        # so every column line has the same shape.
        line, carry = column_line(col, column_digits(operands, col) + ([carry] if col > 0 else []))
        lines.append(line)
    lines.append(f"A:{sum(operands)}\n")
    return "".join(lines)


def column_digits(operands: tuple[int, ...], col: int) -> list[int]:
    """The digits of column `col` (0 = units) of the operands that have one."""
    return [int(str(x)[-1 - col]) for x in operands if col < len(str(x))]


def column_line(col: int, terms: list[int]) -> tuple[str, int]:
    """(the line adding `terms` as a chain of two-term sums, then its digit and carry; the carry)."""
    total = terms[0]
    sums = []
    for term in terms[1:]:
        sums.append(f"{total}+{term}={total + term}")
        total += term
    return f"{col + 1}:{','.join(sums)}>{total % 10}c{total // 10}\n", total // 10


def extract_answer(text: str) -> int | None:
    """The final answer of a generated completion: its last non-empty line when that is exactly an
    answer line, else None (no answer, a garbled one, or text after it)."""
    lines = [line for line in text.split("\n") if line]
    match = _ANSWER_RE.fullmatch(lines[-1]) if lines else None
    return int(match.group(1)) if match else None


def is_correct(problem: Problem, completion: str) -> bool:
    """Exact match of the completion's final answer against the true sum."""
    return extract_answer(completion) == problem.answer


def split_of(problem: Problem) -> str:
    digest = hashlib.sha256(problem.prompt.encode()).digest()
    return "eval" if digest[0] % HASH_BUCKETS < EVAL_BUCKETS else "train"


def random_problem(rng: random.Random) -> Problem:
    n_operands = rng.randint(MIN_OPERANDS, MAX_OPERANDS)
    operands = []
    for _ in range(n_operands):
        digits = rng.randint(MIN_DIGITS, MAX_DIGITS)
        operands.append(rng.randint(10 ** (digits - 1), 10**digits - 1))
    return Problem(tuple(operands))


def problem_stream(split: str, seed: int = 0) -> Iterator[Problem]:
    """Distinct problems of `split` ('train' or 'eval') without end, the same order for the same seed.

    A trainer draws each step's problems as it goes: a long run does not wait for all of them at its
    start."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # The split name is mixed into the seed so train and eval streams differ even at the same seed.
    return _distinct_problems(split, random.Random(f"{split}:{seed}"))


def _distinct_problems(split: str, rng: random.Random) -> Iterator[Problem]:
    # Apart from problem_stream so a bad split is refused at the call, not at the first problem.
    seen: set[tuple[int, ...]] = set()
    while True:
        problem = random_problem(rng)
        if problem.operands in seen or split_of(problem) != split:
            continue
        seen.add(problem.operands)
        yield problem


def problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    """The first `n` problems of `problem_stream(split, seed)`."""
    return list(itertools.islice(problem_stream(split, seed), n))
