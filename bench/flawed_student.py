"""A student with the capacity to do better and one systematic habit the teacher does not share:
trained by `opd make-models`' SFT recipe (in fp32 on a CPU without native bf16, as make-models), but
on worked solutions from a tutor that drops the carry out of any column whose total is 10 to
--slip-max (12 by default). The teacher learned from the correct solutions, so on the student's own
rollouts it flags exactly the tokens of the habit; OPD from such a student is the experiment in
bench/results/FINDINGS.md ("A student with a habit").

    python bench/flawed_student.py --out /tmp/flawed-student            # about 17 min on 2 cores
    python bench/flawed_student.py --out /tmp/flawed-student --eval-only  # its two accuracies
    python bench/opd_inprocess.py reverse_kl --student /tmp/flawed-student --lr 1e-4 --warmup 10 \
        --steps 128 --eval-every 32

Prints the student's greedy accuracy on held-out problems against the true sums and against the
tutor's answers (how faithfully it learned the habit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opd import sft  # noqa: E402
from opd.evaluate import evaluate  # noqa: E402
from opd.models import load_model, tiny_config  # noqa: E402
from shared.flags import positive_int  # noqa: E402
from shared.task import Problem, column_digits, column_line, problems  # noqa: E402
from shared.tokenizer import build_tokenizer  # noqa: E402


def tutor_solution(operands: tuple[int, ...], slip_max: int) -> tuple[str, int]:
    """(the tutor's worked solution, its answer): the task's format, the carry out of a column whose
    total is 10..slip_max dropped, and the answer read off the digits it wrote."""
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


def tutored(slip_max: int) -> tuple[type[Problem], type[Problem]]:
    """Problem types whose target is the tutor's solution: one scored against the true sum, one
    against the tutor's answer."""

    class Tutored(Problem):
        @property
        def target(self) -> str:
            return tutor_solution(self.operands, slip_max)[0]

    class TutorAnswer(Tutored):
        @property
        def answer(self) -> int:
            return tutor_solution(self.operands, slip_max)[1]

    return Tutored, TutorAnswer


def student_config(layers: int, intermediate: int):
    def config(kind, *args):
        cfg = tiny_config(kind, *args)
        cfg.num_hidden_layers, cfg.intermediate_size = layers, intermediate
        return cfg

    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the student")
    parser.add_argument("--slip-max", type=int, default=12, help="largest total whose carry drops")
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--intermediate", type=positive_int, default=352, help="MLP width")
    parser.add_argument("--steps", type=positive_int, default=1600, help="SFT steps of 64")
    parser.add_argument("--eval-n", type=positive_int, default=200, help="held-out problems")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tutored_problem, tutor_answer = tutored(args.slip_max)
    if not args.eval_only:
        # make-models' recipe with two things changed: the student's shape and its solutions.
        sft.tiny_config = student_config(args.layers, args.intermediate)
        sft.problems = lambda split, n, seed: [
            tutored_problem(p.operands) for p in problems(split, n, seed)
        ]
        cfg = sft.SFTConfig("student", steps=args.steps, eval_every=200)
        print(json.dumps(sft.train(cfg, build_tokenizer(), Path(args.out))), flush=True)
    model, tokenizer = load_model(args.out)
    held_out = problems("eval", args.eval_n, seed=0)
    true = evaluate(model, tokenizer, held_out, progress=False).accuracy
    tutor = [tutor_answer(p.operands) for p in held_out]
    faithful = evaluate(model, tokenizer, tutor, progress=False).accuracy
    print(
        f"{args.out}: greedy accuracy {true:.1%} against the true sums, {faithful:.1%} against "
        f"the tutor's answers ({args.eval_n} held-out problems)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
