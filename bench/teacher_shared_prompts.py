"""Scoring a trainer's samples with each prompt run once (the hf backend's shared-prompt pass)
against one pass over the whole sequences, side by side in one run, in-process on the bundled
teacher: what the demo's teacher does each step, at each of its horizons.

    python bench/teacher_shared_prompts.py                   # about a minute on 2 CPU cores
    python bench/teacher_shared_prompts.py --prompts 64 --samples 8

Each row scores `prompts` task prompts x `samples` completions of `horizon` tokens (the reference
solution's, cut there), as one batch, `repeats` times alternating the two passes, and gives the
median seconds of each; the log-probs of the two agree to the number printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from opd.bundled import TEACHER_PATH  # noqa: E402
from services.teacher.backends.base import ScoreJob  # noqa: E402
from services.teacher.backends.hf import HFBackend  # noqa: E402
from shared.flags import positive_int  # noqa: E402
from shared.task import problems  # noqa: E402


def jobs_for(backend: HFBackend, prompts: int, samples: int, horizon: int) -> list[ScoreJob]:
    jobs = []
    for p in problems("train", prompts, seed=0):
        prompt = backend.tokenizer(p.prompt)["input_ids"]
        target = backend.tokenizer(p.target, add_special_tokens=False)["input_ids"]
        jobs += [ScoreJob(prompt + target[:horizon], len(prompt)) for _ in range(samples)]
    return jobs


def timed(backend: HFBackend, jobs: list[ScoreJob]) -> tuple[float, list]:
    start = time.perf_counter()
    scores = backend.score_batch(jobs)
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=positive_int, default=16)
    parser.add_argument("--samples", type=positive_int, default=4)
    parser.add_argument("--horizons", type=positive_int, nargs="+", default=[26, 64, 128, 256])
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads (the demo's 1)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = HFBackend(str(TEACHER_PATH))
    one_pass = HFBackend(str(TEACHER_PATH), share_prompts=False)
    backend.load()
    one_pass.load()
    print(f"{args.prompts} prompts x {args.samples} samples, {args.threads} thread(s), float32")
    print(
        f"{'horizon':>7} {'tokens':>7} {'one pass s':>10} {'shared s':>9} {'ratio':>6} {'max |diff|':>10}"
    )
    for horizon in args.horizons:
        jobs = jobs_for(backend, args.prompts, args.samples, horizon)
        timed(backend, jobs)  # warm-up
        plain_s, shared_s = [], []
        for _ in range(args.repeats):
            seconds, plain = timed(one_pass, jobs)
            plain_s.append(seconds)
            seconds, shared = timed(backend, jobs)
            shared_s.append(seconds)
        diff = max(float(np.abs(a.logprobs - b.logprobs).max()) for a, b in zip(plain, shared))
        p, s = statistics.median(plain_s), statistics.median(shared_s)
        tokens = sum(len(j.input_ids) for j in jobs)
        print(f"{horizon:>7} {tokens:>7} {p:>10.3f} {s:>9.3f} {s / p:>6.2f} {diff:>10.1e}")


if __name__ == "__main__":
    main()
