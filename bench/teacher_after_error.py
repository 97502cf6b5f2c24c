"""What the teacher writes after a student-style error: a wrong operand digit in the first column.

For held-out problems whose first column has at least 3 terms, the prefix is the prompt and the
first column's line up to its second term, with that term replaced by a wrong digit ("1:8+3=" where
the reference says "1:8+2="); the teacher continues greedily to the end. The control gives the same
prefix with the right digit. Each continuation is parsed into its column lines and checked:

- sum follows the page: every "x+y=z" it writes has z = x + y (the teacher keeps its own arithmetic);
- rest of the line: the first column's remaining terms are the operands' remaining digits;
- later columns: every later column adds the right operand digits (carries aside);
- answer follows the page: the A: line is the number its own column digits spell.

`--make-robust DIR` first fine-tunes the teacher so that it keeps going right after a slip: half of
each batch is a worked solution with one wrong term written somewhere (a digit or a carry), the rest
of the page following from it, and the wrong term itself left out of the loss; the result is saved to
DIR and probed instead. It tests whether the teacher's targets after a student's first error are what
makes on-policy distillation fail here (`python bench/opd_inprocess.py --teacher DIR`).

    python bench/teacher_after_error.py --n 200    # output in bench/results/teacher_after_error.log
    python bench/teacher_after_error.py --make-robust /tmp/robust-teacher --steps 300
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opd.bundled import TEACHER_PATH  # noqa: E402
from opd.evaluate import completion_text, evaluate  # noqa: E402
from opd.models import ModelLoadError, check_loadable, load_model  # noqa: E402
from opd.sft import SFTConfig, cpu_has_native_bf16, lr_at, sft_batch, sft_step  # noqa: E402
from shared.flags import positive_int  # noqa: E402
from shared.task import (  # noqa: E402
    MAX_NEW_TOKENS,
    Problem,
    column_digits,
    column_line,
    problems,
)

_LINE_RE = re.compile(r"^(\d+):([0-9+=,]+)>(\d)c(\d+)$")
CHECKS = ("sum follows the page", "rest of the line", "later columns", "answer follows the page")


def parse(text: str) -> tuple[list[list[int]], list[bool], str, str | None]:
    """(terms per column line, whether each x+y=z holds, the number its column lines spell, answer)."""
    terms, sums_ok, digits, carry, answer = [], [], [], "0", None
    for line in text.splitlines():
        if line.startswith("A:"):
            answer = line[2:]
            break
        m = _LINE_RE.match(line)
        if not m:
            break
        chain = [s.split("=") for s in m.group(2).split(",")]
        line_terms = [int(chain[0][0].split("+")[0])] + [int(c[0].split("+")[1]) for c in chain]
        sums_ok += [sum(map(int, lhs.split("+"))) == int(rhs) for lhs, rhs in chain]
        terms.append(line_terms)
        digits.append(m.group(3))
        carry = m.group(4)
    spelled = (carry if carry != "0" else "") + "".join(reversed(digits))
    return terms, sums_ok, spelled, answer


def checks(problem: Problem, text: str) -> dict[str, bool]:
    terms, sums_ok, spelled, answer = parse(text)
    width = max(len(str(x)) for x in problem.operands)
    columns = [column_digits(problem.operands, col) for col in range(width)]
    later = [
        col < len(terms) and terms[col][: len(columns[col])] == columns[col]
        for col in range(1, width)
    ]
    return {
        "sum follows the page": bool(sums_ok) and all(sums_ok),
        "rest of the line": bool(terms) and terms[0][2:] == columns[0][2:],
        "later columns": all(later),
        "answer follows the page": answer is not None and answer == spelled,
    }


@dataclass(frozen=True)
class Slipped:
    """A worked solution with one wrong term at character `slip` of `target` (sft_batch reads
    `prompt` and `target`)."""

    prompt: str
    target: str
    slip: int


def slipped(problem: Problem, rng: random.Random) -> Slipped:
    """The solution with one term written wrong (a digit off, or a wrong carry) in a random column;
    every later sum, carry and the answer follow from what is on the page."""
    width = max(len(str(x)) for x in problem.operands)
    slip_col, text, carry = rng.randrange(width), "", 0
    for col in range(width):
        terms = column_digits(problem.operands, col) + ([carry] if col > 0 else [])
        if col == slip_col:
            k = rng.randrange(len(terms))
            if k == len(terms) - 1 and col > 0:
                terms[k] = rng.choice([c for c in range(4) if c != terms[k]])
            else:
                terms[k] = (terms[k] + rng.randint(1, 9)) % 10
        line, carry = column_line(col, terms)
        text += line
    digits = "".join(line.split(">")[1][0] for line in text.splitlines())[::-1]
    target = f"{text}A:{int(str(carry) + digits)}\n"
    # Every term is one character and the slipped one differs from the reference's, so the texts
    # part exactly there.
    slip = next(i for i, (a, b) in enumerate(zip(target, problem.target)) if a != b)
    return Slipped(problem.prompt, target, slip)


def make_robust(teacher, tokenizer, out: str, steps: int, seed: int) -> None:
    """Fine-tune on half clean, half slipped solutions (batch 64, AdamW lr 3e-4 with 20 warmup steps
    and cosine decay, bf16 autocast where the CPU has it, as `opd make-models`), then save to `out`."""
    cfg = SFTConfig("teacher", steps=steps, lr=3e-4, warmup=20, seed=seed)
    rng = random.Random(seed)
    data = problems("train", steps * cfg.batch_size, seed=seed + 7)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bf16 = cpu_has_native_bf16()
    for step in tqdm(range(steps), desc="slip fine-tune", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = data[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        batch = [slipped(p, rng) if i % 2 else p for i, p in enumerate(batch)]
        ids, labels = sft_batch(tokenizer, batch)
        for b, item in enumerate(batch):
            # Never teach the slip itself: the target's labels start at the first one that is not
            # -100, and the tokenizer has one token per character.
            if isinstance(item, Slipped):
                labels[b, int((labels[b] != -100).nonzero()[0]) + item.slip] = -100
        sft_step(teacher, optimizer, ids, labels, bf16=bf16)
    teacher.eval()
    teacher.save_pretrained(out)
    tokenizer.save_pretrained(out)
    accuracy = evaluate(teacher, tokenizer, problems("eval", 200, seed), progress=False).accuracy
    print(f"saved {out}: greedy accuracy {accuracy:.1%} on 200 held-out problems", flush=True)


def continuation(teacher, tokenizer, text: str) -> str:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = teacher.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return completion_text(tokenizer, out[0, ids.shape[1] :].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default=str(TEACHER_PATH), help="default: the bundled one")
    parser.add_argument(
        "--n", type=positive_int, default=200, help="problems with >= 3 first-column terms"
    )
    parser.add_argument("--seed", type=int, default=0, help="problems and slips (default 0)")
    parser.add_argument("--make-robust", metavar="DIR", help="slip fine-tune, save here, probe it")
    parser.add_argument(
        "--steps", type=positive_int, default=300, help="fine-tune steps (--make-robust)"
    )
    args = parser.parse_args()
    try:
        check_loadable(args.teacher)
    except ModelLoadError as exc:
        parser.error(f"--teacher {exc}")
    teacher, tokenizer = load_model(args.teacher)
    if args.make_robust:
        make_robust(teacher, tokenizer, args.make_robust, args.steps, args.seed)
        args.teacher = args.make_robust
    rng = random.Random(args.seed)
    chosen = [p for p in problems("eval", 4 * args.n, args.seed) if len(p.operands) >= 3][: args.n]
    counts = {kind: dict.fromkeys(CHECKS, 0) for kind in ("control", "wrong digit")}
    for problem in chosen:
        first, second = column_digits(problem.operands, 0)[:2]
        wrong = (second + rng.randint(1, 9)) % 10
        for kind, digit in (("control", second), ("wrong digit", wrong)):
            page = f"1:{first}+{digit}="
            written = page + continuation(teacher, tokenizer, problem.prompt + page)
            for check, ok in checks(problem, written).items():
                counts[kind][check] += ok
    n = len(chosen)
    print(f"teacher {args.teacher}, {n} held-out problems (seed {args.seed}), greedy")
    print(f"{'check':26s} {'control':>9s} {'wrong digit':>12s}")
    for check in CHECKS:
        print(
            f"{check:26s} {counts['control'][check] / n:9.1%} {counts['wrong digit'][check] / n:12.1%}"
        )


if __name__ == "__main__":
    main()
