"""OPD with the teacher in the same process (no HTTP), to study the learning signal itself: the trainer's
rollout and loss code, plus losses that need the teacher's full distribution, and an SFT control.

    python bench/opd_inprocess.py reverse_kl --steps 120 --lr 1e-4 --eval-every 30
    python bench/opd_inprocess.py sft --steps 40 --lr 3e-4     # ground truth, same optimiser and batch

Modes: reverse_kl (the trainer's policy-gradient loss on A_t = log p_T - log p_S), exact_reverse_kl
(sum over the vocabulary of p_S (log p_S - log p_T) at each position of the student's rollouts),
forward_kl (sum of p_T (log p_T - log p_S) there) and sft (cross-entropy on the reference solutions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opd.evaluate import evaluate  # noqa: E402
from opd.models import STUDENT_PATH, TEACHER_PATH, load_model  # noqa: E402
from opd.sft import sft_batch  # noqa: E402
from services.trainer import losses  # noqa: E402
from services.trainer.rollout import sample_rollouts  # noqa: E402
from services.trainer.step import sampled_logprobs, student_logprobs  # noqa: E402
from shared.task import MAX_NEW_TOKENS, problems  # noqa: E402

MODES = ("reverse_kl", "exact_reverse_kl", "forward_kl", "sft")


def opd_loss(mode: str, student, teacher, tokenizer, batch, samples, generator) -> torch.Tensor:
    rollouts = sample_rollouts(
        student, tokenizer, batch, samples, MAX_NEW_TOKENS, generator, lambda _: None, 10**9
    )
    with torch.no_grad():
        teacher_B_T_V, mask_B_T = student_logprobs(teacher, rollouts)
    student_B_T_V, _ = student_logprobs(student, rollouts)
    if mode == "exact_reverse_kl":
        return losses.full_reverse_kl(student_B_T_V, teacher_B_T_V, mask_B_T)
    if mode == "forward_kl":
        return losses.full_forward_kl(student_B_T_V, teacher_B_T_V, mask_B_T)
    student_B_T = sampled_logprobs(student_B_T_V, rollouts)
    teacher_B_T = sampled_logprobs(teacher_B_T_V, rollouts)
    adv_B_T = losses.reverse_kl_advantage(teacher_B_T, student_B_T, mask_B_T)
    return losses.policy_gradient_loss(student_B_T, student_B_T.detach(), adv_B_T, mask_B_T)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--student", default=str(STUDENT_PATH))
    parser.add_argument("--teacher", default=str(TEACHER_PATH))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    parser.add_argument("--prompts", type=int, default=16, help="problems per step")
    parser.add_argument("--samples", type=int, default=4, help="rollouts (or copies) per problem")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    teacher, tokenizer = load_model(args.teacher)
    student, _ = load_model(args.student)
    data = problems("train", args.steps * args.prompts, args.seed)
    eval_set = problems("eval", args.eval_n, args.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    accuracy = evaluate(student, tokenizer, eval_set, progress=False).accuracy
    print(f"{args.mode} lr {args.lr}: step 0 accuracy {accuracy:.3f}", flush=True)
    for step in range(args.steps):
        batch = data[step * args.prompts : (step + 1) * args.prompts]
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        if args.mode == "sft":
            ids, labels = sft_batch(tokenizer, [p for p in batch for _ in range(args.samples)])
            loss = student(input_ids=ids, labels=labels).loss
        else:
            loss = opd_loss(args.mode, student, teacher, tokenizer, batch, args.samples, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            accuracy = evaluate(student, tokenizer, eval_set, progress=False).accuracy
            print(
                f"step {step + 1} loss {float(loss.detach()):.4f} accuracy {accuracy:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
