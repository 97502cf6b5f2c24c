"""`opd`: the bundled task, the bundled models, evaluation, and the distillation demo.

opd task --n 3                          # print problems with their worked solutions
opd task --stats                        # reasoning-length distribution
opd make-models                         # train models/tiny-teacher and models/tiny-student
opd eval --model models/tiny-student --n 500 [--json]
opd demo                                # the README's main job: the distillation demo
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

from opd.bundled import REPO_ROOT
from opd.tutor import SLIP_MAX
from shared.flags import (
    Parser,
    add_flags,
    non_negative_int,
    out_folder,
    positive_int,
    problem_count,
    sample_count,
    seed,
    thread_count,
)
from shared.task import SPLITS, problems


def cmd_task(args: argparse.Namespace) -> int:
    items = problems(args.split, args.n, args.seed)
    if not args.stats:
        for problem in items:
            print(problem.prompt + problem.target)
        return 0
    # One character is one token; +1 for <eos>.
    lengths = sorted(len(p.target) + 1 for p in items)
    print(
        f"{args.split} split, {len(items)} problems: reasoning tokens "
        f"median {statistics.median(lengths):g}, p90 {lengths[int(0.9 * (len(lengths) - 1))]}, "
        f"max {lengths[-1]}, min {lengths[0]}"
    )
    return 0


def cmd_make_models(args: argparse.Namespace) -> int:
    import torch

    from opd.sft import SFTConfig, train
    from shared.tokenizer import build_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    plans = {
        "teacher": SFTConfig(
            "teacher", steps=args.teacher_steps, eval_every=200, stop_above=0.995, seed=args.seed
        ),
        # The student learns the tutor's habit to the end of its schedule: well-formed, and wrong
        # wherever a dropped carry matters.
        "student": SFTConfig(
            "student",
            steps=args.student_steps,
            eval_every=200,
            slip_max=args.slip_max,
            seed=args.seed,
        ),
    }
    kinds = list(dict.fromkeys(args.only or ["teacher", "student"]))  # each trained once
    for kind in kinds:  # a folder that cannot be written is found now, not after the training
        out = Path(args.out_dir) / f"tiny-{kind}"
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(
                f"opd make-models: error: --out-dir: cannot make {out} ({exc.strerror})",
                file=sys.stderr,
            )
            return 2
    for kind in kinds:
        out = Path(args.out_dir) / f"tiny-{kind}"
        print(f"training {kind} -> {out}", flush=True)
        report = train(plans[kind], tokenizer, out)
        print(json.dumps(report), flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from opd.evaluate import evaluate
    from opd.models import ModelLoadError, count_parameters, load_model

    torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model)
    except ModelLoadError as exc:
        print(f"opd eval: error: --model {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    items = problems("eval", args.n, args.seed)
    # One sample is the greedy one; avg@k samples at temperature 1.
    temperature = 0.0 if args.samples == 1 else 1.0
    result = evaluate(
        model,
        tokenizer,
        items,
        args.batch_size,
        args.samples,
        args.seed,
        not args.json,
        temperature,
    )
    report = {"model": str(args.model), "parameters": count_parameters(model), **result.to_dict()}
    if args.json:
        print(json.dumps(report))
    else:
        metric = "accuracy" if args.samples == 1 else f"avg@{args.samples}"
        print(
            f"{args.model}: {metric} {result.accuracy:.1%} on {result.n} held-out problems, "
            f"well-formed {result.well_formed:.1%}, mean {result.mean_tokens:.1f} tokens, "
            f"{result.tokens_per_s:.0f} tokens/s ({time.perf_counter() - start:.1f} s)"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.trainer.config import DEMO_RUN_SETTINGS, RunConfig, api_key_from_env
    from services.trainer.demo import SCHEDULES, DemoConfig, run_demo

    unknown = set(args.schedules or ()) - set(SCHEDULES)
    if unknown:
        print(
            f"opd demo: error: unknown schedule(s) {sorted(unknown)}; choose from {list(SCHEDULES)}",
            file=sys.stderr,
        )
        return 2
    from pydantic import ValidationError

    from opd.models import ModelLoadError
    from services.trainer.loop import RunError
    from shared.errors import TeacherError
    from shared.flags import field_errors, given

    try:
        api_key = api_key_from_env()  # the key a teacher started here reads too
    except ValueError as exc:
        print(f"opd demo: error: {exc}", file=sys.stderr)
        return 2
    cfg = DemoConfig(
        out=args.out,
        steps=args.steps,
        eval_every=args.eval_every,
        eval_n=args.eval_n,
        seed=args.seed,
        schedules=tuple(args.schedules or SCHEDULES),
        teacher_url=args.teacher_url,
        run_settings=given(args, RunConfig, only=DEMO_RUN_SETTINGS),
        api_key=api_key,
    )
    # `timeout` and `docker stop` send SIGTERM: end as on Ctrl-C, so the teacher started here stops.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_demo(cfg)
    except ValidationError as exc:
        print("opd demo: error: " + "; ".join(field_errors(exc)), file=sys.stderr)
        return 2
    except (TeacherError, ModelLoadError, RunError, OSError, RuntimeError) as exc:
        print(f"opd demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("opd demo: interrupted (each finished run is in its folder)", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="opd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    task = sub.add_parser("task", help="print problems of the bundled task, or their length stats")
    task.add_argument("--n", type=problem_count, default=3, help="how many problems (default 3)")
    task.add_argument("--split", choices=SPLITS, default="eval", help="default: eval (held out)")
    task.add_argument("--seed", type=seed, default=0, help="which problems are drawn (default 0)")
    task.add_argument("--stats", action="store_true", help="print the length distribution instead")
    task.set_defaults(func=cmd_task)

    make = sub.add_parser("make-models", help="train the bundled teacher and student from scratch")
    make.add_argument(
        "--out-dir", type=out_folder, default=str(REPO_ROOT / "models"), help="default: models/"
    )
    make.add_argument("--only", nargs="+", choices=["teacher", "student"], help="train only these")
    make.add_argument(
        "--teacher-steps",
        type=positive_int,
        default=1600,
        help="planned SFT steps, batch 64 (default 1600)",
    )
    make.add_argument(
        "--student-steps",
        type=positive_int,
        default=1600,
        help="SFT steps, batch 64 (default 1600)",
    )
    make.add_argument(
        "--slip-max",
        type=positive_int,
        default=SLIP_MAX,
        help="the student's tutor drops the carry out of columns totalling 10 to this "
        f"(default {SLIP_MAX}; 9: no habit, correct solutions)",
    )
    make.add_argument("--seed", type=seed, default=0, help="initialisation and data (default 0)")
    make.add_argument(
        "--threads", type=thread_count, default=2, help="torch CPU threads (default 2)"
    )
    make.set_defaults(func=cmd_make_models)

    demo = sub.add_parser(
        "demo",
        help="distil the bundled teacher into the student with each "
        "horizon schedule (full, TOPD, POPD) and compare them",
        description="Distil the bundled teacher into the student with each horizon schedule, same "
        "seed and steps, and compare them. The run settings below are each run's; with --device "
        "cuda the teacher the demo starts runs on that GPU too.",
    )
    demo.add_argument(
        "--out", type=out_folder, default="runs/demo", help="output folder (default runs/demo)"
    )
    demo.add_argument("--steps", type=positive_int, default=24, help="steps per run (default 24)")
    demo.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=12,
        help="evaluate every N steps, at step 0 and at the end (0: only at step 0 and the end; default 12)",
    )
    demo.add_argument(
        "--eval-n",
        type=problem_count,
        default=200,
        help="held-out problems per evaluation (default 200)",
    )
    demo.add_argument("--seed", type=seed, default=0, help="one seed for every run (default 0)")
    demo.add_argument(
        "--schedules", nargs="+", help="subset of: full topd-10 topd-25 topd-50 popd (default all)"
    )
    demo.add_argument(
        "--teacher-url",
        help="use this teacher server instead of starting one (with the key in "
        "OPD_TEACHER_API_KEY, if set)",
    )
    from services.trainer.config import DEMO_DEFAULTS, DEMO_RUN_SETTINGS, RunConfig

    add_flags(demo, RunConfig, only=DEMO_RUN_SETTINGS, defaults=DEMO_DEFAULTS)
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="greedy accuracy of a model on held-out problems")
    ev.add_argument("--model", required=True, help="folder of a Hugging Face causal LM")
    ev.add_argument("--n", type=problem_count, default=500, help="held-out problems (default 500)")
    ev.add_argument(
        "--samples",
        type=sample_count,
        default=1,
        help="1: greedy accuracy; k > 1: avg@k, sampled at temperature 1 (default 1)",
    )
    ev.add_argument(
        "--batch-size",
        type=positive_int,
        default=128,
        help="problems decoded at once (default 128)",
    )
    ev.add_argument(
        "--seed", type=seed, default=0, help="which problems are drawn, and sampling (default 0)"
    )
    ev.add_argument("--threads", type=thread_count, default=2, help="torch CPU threads (default 2)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Commands import torch where they use it: it takes seconds, which `--help` and `task` should not.
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
