"""Distillation with the teacher in the same process (no HTTP), to study the learning signal itself:
the trainer's rollout and loss code, losses that need the teacher's full distribution, and two controls
trained on ground-truth prefixes instead of the student's own.

    python bench/opd_inprocess.py reverse_kl --steps 20 --eval-every 10
    python bench/opd_inprocess.py sft --prompts 64 --samples 1 --steps 30 --eval-every 10
    python bench/opd_inprocess.py sft --prompts 64 --samples 1 --horizon 40 --steps 20
    python bench/opd_inprocess.py forward_kl --prompts 64 --samples 4 --states clean --steps 10
    python bench/opd_inprocess.py reverse_kl --temperature 0.6 --steps 20 --eval-every 10
    python bench/opd_inprocess.py reverse_kl --optimizer sgd --lr 0.02 --steps 20 --eval-every 10
    python bench/opd_inprocess.py reverse_kl --lr 3e-5 --steps 30 --eval-every 10 --objective
    python bench/opd_inprocess.py forward_kl --prompts 256 --samples 4 --states before_flag \
        --lr 1e-4 --steps 40 --eval-every 10 --objective --device cuda     # bench/gpu_trainer.sh
    python bench/opd_inprocess.py reverse_kl --schedule truncated:0.1 --steps 20 --eval-every 10
    python bench/opd_inprocess.py --align            # first-step alignment of every mode, then exit

Modes on the student's rollouts (sampled at --temperature, 1 by default, cut at --horizon, or at
--schedule's horizon for the step with --horizon as H_max):
reverse_kl (the trainer's policy-gradient loss on A_t = log p_T - log p_S), exact_reverse_kl (sum over
the vocabulary of p_S (log p_S - log p_T) at each position) and forward_kl (sum of p_T (log p_T -
log p_S)). Modes on the reference solutions (teacher-forced, first --horizon target tokens): sft
(cross-entropy on the solution) and gt_forward_kl (forward KL to the teacher's distribution on the
solution's prefixes).
`--states clean|deviated` trains an on-policy mode only on the rollout positions whose prefix still is
the reference solution's, or only on those after the rollout left it; `--states before_flag` only on
the positions up to a rollout's first error as the teacher flags it (>= 2 nats below the student),
which needs no reference solution (the trainer's `--cut-at-error 2`).
Every evaluation prints greedy accuracy and the student's per-token NLL of held-out reference
solutions, a smooth measure of whether an update helped. The runs in bench/results/opd_inprocess.log
distilled the earlier bundled student (f1b1350's, `--student` with its files to repeat them); those in
bench/results/habit_student.log the bundled one.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opd.bundled import STUDENT_PATH, TEACHER_PATH  # noqa: E402
from opd.evaluate import completion_text, evaluate  # noqa: E402
from opd.models import ModelLoadError, load_model  # noqa: E402
from opd.sft import sft_batch  # noqa: E402
from services.trainer import losses  # noqa: E402
from services.trainer.rollout import sample_rollouts  # noqa: E402
from services.trainer.schedules import ScheduleError, parse_schedule  # noqa: E402
from services.trainer.step import sampled_logprobs, student_logprobs  # noqa: E402
from shared.flags import non_negative_int, positive_int
from shared.task import MAX_NEW_TOKENS, Problem, is_correct, problems  # noqa: E402

ON_POLICY = ("reverse_kl", "exact_reverse_kl", "forward_kl")
TEACHER_FORCED = ("sft", "gt_forward_kl")
MODES = ON_POLICY + TEACHER_FORCED
ERROR_NATS = 2.0  # an error: the teacher gives the token this much less log-prob than the student


def rollouts_for(
    student,
    tokenizer,
    batch,
    args,
    generator,
    samples: int | None = None,
    horizon: int | None = None,
):
    """`samples` (default --samples) rollouts of each problem at --temperature, cut at `horizon`
    (default --horizon)."""
    return sample_rollouts(
        student,
        tokenizer,
        batch,
        samples or args.samples,
        horizon or args.horizon,
        generator,
        lambda _: None,
        10**9,
        temperature=args.temperature,
    )


def make_optimizer(student, args) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(student.parameters(), lr=args.lr)
    return torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)


def clean_prefix_mask(tokenizer, rollouts, width: int) -> torch.Tensor:
    """[B, T]: 1 where the rollout so far equals its problem's reference solution (the first
    deviating token included), 0 after it. Only a bench with ground truth can draw this line."""
    clean_B_T = torch.zeros(len(rollouts), width)
    for b, r in enumerate(rollouts):
        ref = tokenizer(r.problem.target, add_special_tokens=False)["input_ids"]
        ref = ref + [tokenizer.eos_token_id]
        same = [x == y for x, y in zip(r.completion_ids, ref)]
        first_deviation = same.index(False) if False in same else len(same)
        clean_B_T[b, : min(first_deviation + 1, len(r.completion_ids))] = 1
    return clean_B_T


def on_policy_loss(
    mode, student, teacher, rollouts, tokenizer=None, states="all", gamma=0.0, baseline=False
):
    with torch.no_grad():
        teacher_B_T_V, mask_B_T = student_logprobs(teacher, rollouts)
    student_B_T_V, _ = student_logprobs(student, rollouts)
    if states == "before_flag":
        mask_B_T = losses.mask_after_first_error(
            sampled_logprobs(teacher_B_T_V, rollouts),
            sampled_logprobs(student_B_T_V, rollouts),
            mask_B_T,
            ERROR_NATS,
        )
    elif states != "all":
        clean_B_T = clean_prefix_mask(tokenizer, rollouts, mask_B_T.shape[1]).to(mask_B_T)
        mask_B_T = mask_B_T * (clean_B_T if states == "clean" else 1 - clean_B_T)
    if mode == "exact_reverse_kl":
        return losses.full_reverse_kl(student_B_T_V, teacher_B_T_V, mask_B_T)
    if mode == "forward_kl":
        return losses.full_forward_kl(student_B_T_V, teacher_B_T_V, mask_B_T)
    student_B_T = sampled_logprobs(student_B_T_V, rollouts)
    teacher_B_T = sampled_logprobs(teacher_B_T_V, rollouts)
    adv_B_T = losses.reverse_kl_advantage(teacher_B_T, student_B_T, mask_B_T, gamma=gamma)
    if baseline:
        adv_B_T = adv_B_T - group_mean_return(adv_B_T, mask_B_T, rollouts)
    return losses.policy_gradient_loss(student_B_T, student_B_T.detach(), adv_B_T, mask_B_T)


def group_mean_return(adv_B_T, mask_B_T, rollouts) -> torch.Tensor:
    """[B, T]: at each position, the mean advantage over the rollouts of the same problem that reach
    it (a per-problem, per-position baseline; it changes the variance, not the expected gradient)."""
    out = torch.zeros_like(adv_B_T)
    keys = [r.problem.prompt for r in rollouts]
    for key in set(keys):
        rows = [b for b, k in enumerate(keys) if k == key]
        total = (adv_B_T[rows] * mask_B_T[rows]).sum(0)
        count = mask_B_T[rows].sum(0).clamp(min=1)
        out[rows] = (total / count) * mask_B_T[rows]
    return out


def teacher_forced_logprobs(model, tokenizer, batch: list[Problem], horizon: int):
    """(logp_B_T_V, labels_B_T, mask_B_T) at the positions that predict the first `horizon` tokens of
    each reference solution (and its eos)."""
    ids_B_L, labels_B_L = (t.to(model.device) for t in sft_batch(tokenizer, batch))
    labels_B_T = labels_B_L[:, 1:]
    mask_B_T = (labels_B_T != -100).float()
    mask_B_T = mask_B_T * (mask_B_T.cumsum(1) <= horizon).float()
    logp_B_T_V = torch.log_softmax(model(input_ids=ids_B_L).logits[:, :-1].float(), dim=-1)
    return logp_B_T_V, labels_B_T.clamp(min=0), mask_B_T


def teacher_forced_loss(mode, student, teacher, tokenizer, batch, horizon):
    student_B_T_V, labels_B_T, mask_B_T = teacher_forced_logprobs(
        student, tokenizer, batch, horizon
    )
    if mode == "gt_forward_kl":
        with torch.no_grad():
            teacher_B_T_V, _, _ = teacher_forced_logprobs(teacher, tokenizer, batch, horizon)
        return losses.full_forward_kl(student_B_T_V, teacher_B_T_V, mask_B_T)
    nll_B_T = -student_B_T_V.gather(2, labels_B_T[..., None]).squeeze(-1)
    return losses.masked_mean(nll_B_T, mask_B_T)


def teacher_forced_mode_loss(mode, student, teacher, tokenizer, batch, args, horizon: int):
    copies = [p for p in batch for _ in range(args.samples)]
    return teacher_forced_loss(mode, student, teacher, tokenizer, copies, horizon)


def reference_nll(student, tokenizer, held_out: list[Problem]) -> float:
    with torch.no_grad():
        return float(teacher_forced_loss("sft", student, None, tokenizer, held_out, 10**9))


def flat_grad(loss: torch.Tensor, model) -> torch.Tensor:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]
    )


@dataclass
class ErrorSplit:
    """Teacher and student log-probs on a set of rollouts, and the split at each first error."""

    teacher_B_T_V: torch.Tensor
    teacher_B_T: torch.Tensor
    student_B_T: torch.Tensor
    mask_B_T: torch.Tensor  # real tokens
    kept_B_T: torch.Tensor  # real tokens up to a rollout's first error, the error included
    with_error: int  # rollouts that contain an error

    @property
    def after_B_T(self) -> torch.Tensor:
        return self.mask_B_T - self.kept_B_T


def split_at_first_error(student, teacher, rollouts) -> ErrorSplit:
    """An error is a token the teacher gives at least ERROR_NATS less log-prob than the student."""
    with torch.no_grad():
        teacher_B_T_V, mask_B_T = student_logprobs(teacher, rollouts)
        student_B_T_V, _ = student_logprobs(student, rollouts)
    teacher_B_T = sampled_logprobs(teacher_B_T_V, rollouts)
    student_B_T = sampled_logprobs(student_B_T_V, rollouts)
    errors_B_T = losses.errors(teacher_B_T, student_B_T, mask_B_T, ERROR_NATS)
    kept_B_T = losses.mask_up_to_first(errors_B_T, mask_B_T)
    return ErrorSplit(
        teacher_B_T_V, teacher_B_T, student_B_T, mask_B_T, kept_B_T, int(errors_B_T.any(1).sum())
    )


def print_error_states(student, teacher, rollouts) -> None:
    """How many rollouts contain an error, how many rollout tokens come after a rollout's first
    error, and how sure the teacher is on the tokens up to that error and after it (its mean
    entropy)."""
    split = split_at_first_error(student, teacher, rollouts)
    entropy_B_T = -(split.teacher_B_T_V.exp() * split.teacher_B_T_V).sum(-1)
    print(
        f"rollouts with an error: {split.with_error} of {len(rollouts)}; tokens after a rollout's "
        f"first error: {int(split.after_B_T.sum())} of {int(split.mask_B_T.sum())}; teacher "
        f"entropy (nats) up to it {float(losses.masked_mean(entropy_B_T, split.kept_B_T)):.4f}, "
        f"after it {float(losses.masked_mean(entropy_B_T, split.after_B_T)):.4f}"
    )


def objective_report(student, teacher, tokenizer, held_out: list[Problem], args) -> str:
    """OPD's own objective on 4 fresh rollouts of each held-out problem (the same sampling seed each
    time, whatever the mode's --samples): the per-token reverse KL, also up to each rollout's first
    error and after it, next to the share of rollouts with an error and of rollouts that are correct."""
    generator = torch.Generator(student.device).manual_seed(0)
    rollouts = rollouts_for(student, tokenizer, held_out, args, generator, samples=4)
    split = split_at_first_error(student, teacher, rollouts)

    def kl(where_B_T: torch.Tensor) -> float:
        return losses.reverse_kl_estimate(split.teacher_B_T, split.student_B_T, where_B_T)

    correct = sum(
        is_correct(r.problem, completion_text(tokenizer, r.completion_ids)) for r in rollouts
    )
    return (
        f"rollouts: reverse KL {kl(split.mask_B_T):.3f} (up to first error "
        f"{kl(split.kept_B_T):.3f}, after {kl(split.after_B_T):.3f}), with an error "
        f"{split.with_error / len(rollouts):.3f}, correct {correct / len(rollouts):.3f}"
    )


def print_alignment(student, teacher, tokenizer, args) -> None:
    """How well each mode's first AdamW step (the sign of its gradient) and its raw gradient point
    down the reference-solution NLL of *other* problems, next to an SFT batch's own numbers. The
    on-policy modes share one set of rollouts."""
    target = flat_grad(
        teacher_forced_loss("sft", student, None, tokenizer, problems("train", 64, 101), 10**9),
        student,
    )
    batch = problems("train", args.prompts, args.seed)
    rollouts = rollouts_for(
        student, tokenizer, batch, args, torch.Generator(student.device).manual_seed(args.seed)
    )
    print_error_states(student, teacher, rollouts)
    print("mode              cos(grad, ref)  sign step . ref (normalised)")
    for mode in MODES:
        if mode in ON_POLICY:
            loss = on_policy_loss(mode, student, teacher, rollouts)
        else:
            loss = teacher_forced_mode_loss(mode, student, teacher, tokenizer, batch, args)
        g = flat_grad(loss, student)
        cos = float(g @ target / (g.norm() * target.norm()))
        sign = float(torch.sign(g) @ target / (target.norm() * g.numel() ** 0.5))
        print(f"{mode:17s} {cos:+14.3f}  {sign:+.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=MODES, nargs="?", default="reverse_kl")
    parser.add_argument("--student", default=str(STUDENT_PATH))
    parser.add_argument("--teacher", default=str(TEACHER_PATH))
    parser.add_argument("--steps", type=positive_int, default=40, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="linear warmup steps")
    parser.add_argument("--prompts", type=positive_int, default=16, help="problems per step")
    parser.add_argument(
        "--samples", type=positive_int, default=4, help="rollouts (or copies) per problem"
    )
    parser.add_argument(
        "--horizon", type=int, default=MAX_NEW_TOKENS, help="tokens per rollout or solution"
    )
    parser.add_argument(
        "--schedule",
        default="full",
        help="the trainer's horizon schedule with --horizon as H_max (services/trainer/"
        "schedules.py): full, truncated:R, progressive:h0=A,dh=B,every=C, linear:h0=A,steps=C",
    )
    parser.add_argument(
        "--states",
        choices=["all", "clean", "deviated", "before_flag"],
        default="all",
        help="on-policy modes: train on every rollout position, only on those whose prefix is the "
        "reference solution's (clean), only on those after the rollout left it (deviated), or "
        "on those up to the rollout's first teacher-flagged error (before_flag: the trainer's "
        "--cut-at-error 2, no reference needed)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="on-policy modes: sample the rollouts at this temperature (the losses still use the "
        "student's temperature-1 log-probs, as if on-policy)",
    )
    parser.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default="adamw",
        help="sgd: plain SGD, whose step follows the clipped gradient's size instead of AdamW's "
        "per-weight sign-like first steps",
    )
    parser.add_argument(
        "--eval-every", type=non_negative_int, default=20, help="steps between evaluations (0: end)"
    )
    parser.add_argument(
        "--eval-n", type=positive_int, default=200, help="held-out problems per evaluation"
    )
    parser.add_argument(
        "--gamma",
        type=float,
        default=0.0,
        help="reverse_kl: discount of future advantages (1: each token's return is the rest of "
        "the rollout's log-ratio, the sequence-level reverse KL's policy gradient)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="reverse_kl: subtract the mean advantage at each position over the problem's rollouts",
    )
    parser.add_argument("--seed", type=int, default=0, help="data, sampling and evaluation seed")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both models)")
    parser.add_argument(
        "--objective",
        action="store_true",
        help="each evaluation also prints OPD's objective (per-token reverse KL, split at the first "
        "error) on 4 fresh rollouts of each held-out problem",
    )
    parser.add_argument("--align", action="store_true", help="print first-step alignment, exit")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    try:
        teacher, tokenizer = load_model(args.teacher, device=args.device)
        student, _ = load_model(args.student, device=args.device)
    except ModelLoadError as exc:
        parser.error(str(exc))
    if args.align:
        print_alignment(student, teacher, tokenizer, args)
        return
    data = problems("train", args.steps * args.prompts, args.seed)
    eval_set = problems("eval", args.eval_n, args.seed)
    held_out = problems("eval", 64, args.seed + 1)
    optimizer = make_optimizer(student, args)
    generator = torch.Generator(student.device).manual_seed(args.seed)

    try:
        schedule = parse_schedule(args.schedule, args.horizon)
    except ScheduleError as exc:
        parser.error(str(exc))
    spent = Spent()

    def report(step: int) -> None:
        accuracy = evaluate(student, tokenizer, eval_set, progress=False).accuracy
        nll = reference_nll(student, tokenizer, held_out)
        line = f"step {step} accuracy {accuracy:.3f} reference NLL {nll:.4f}"
        if step:
            line += f" train_s {spent.seconds:.1f}"
            line += f" tokens {spent.tokens}" * (args.mode in ON_POLICY)
        if args.objective:
            line += "; " + objective_report(student, teacher, tokenizer, held_out, args)
        print(line, flush=True)

    loss_knobs = f" gamma {args.gamma}" * (args.gamma > 0) + " baseline" * args.baseline
    print(
        f"{args.mode} lr {args.lr} horizon {args.horizon} schedule {args.schedule}{loss_knobs}",
        flush=True,
    )
    report(0)
    for step in range(args.steps):
        started = time.perf_counter()
        batch = data[step * args.prompts : (step + 1) * args.prompts]
        horizon = schedule.horizon(step)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        if args.mode in ON_POLICY:
            rollouts = rollouts_for(student, tokenizer, batch, args, generator, horizon=horizon)
            spent.tokens += sum(len(r.completion_ids) for r in rollouts)
            loss = on_policy_loss(
                args.mode,
                student,
                teacher,
                rollouts,
                tokenizer,
                args.states,
                gamma=args.gamma,
                baseline=args.baseline,
            )
        else:
            loss = teacher_forced_mode_loss(
                args.mode, student, teacher, tokenizer, batch, args, horizon
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        if student.device.type == "cuda":
            torch.cuda.synchronize(student.device)
        spent.seconds += time.perf_counter() - started
        if (args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == args.steps:
            report(step + 1)


@dataclass
class Spent:
    """Training cost so far, evaluations left out: seconds, and rollout tokens sampled (each of
    which the teacher scores)."""

    seconds: float = 0.0
    tokens: int = 0


if __name__ == "__main__":
    main()
