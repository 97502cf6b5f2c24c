"""The trainer's teacher feed with many small frames: one step's wall-clock for N one-rollout frames
against the bundled teacher in its own process. Its per-frame bookkeeping must stay flat as frames
grow (until commit c78469f it recounted every rollout of the step per frame: on the 2-core CPU,
8,000 frames took 25.0 s at aa8bc88 against 5.4 s at c78469f; output in bench/results/feed_frames.log).

    python bench/feed_frames.py                 # 500, 2000 and 8000 frames
    python bench/feed_frames.py --frames 65536
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opd.bundled import TEACHER_PATH  # noqa: E402
from services.teacher.process import start_teacher, stop  # noqa: E402
from services.trainer.rollout import Rollout  # noqa: E402
from services.trainer.teacher_feed import TeacherFeed  # noqa: E402
from shared.task import problems  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[500, 2000, 8000])
    parser.add_argument("--frames-in-flight", type=int, default=64)
    args = parser.parse_args()
    proc, url = start_teacher(str(TEACHER_PATH), threads=1)
    problem = problems("train", 1, seed=0)[0]
    feed = TeacherFeed([url], frames_in_flight=args.frames_in_flight)
    try:
        print("| frames (1 rollout, 3 tokens each) | step s | ms per frame |")
        print("| --- | --- | --- |")
        for n in args.frames:
            step = feed.begin(max_positions=8)
            started = time.perf_counter()
            for key in range(n):
                step.put([Rollout(key, problem, [1, 21, 18], [5, 6, 7], [0.0] * 3, True)])
            scores, _ = step.finish()
            took = time.perf_counter() - started
            assert len(scores) == n
            print(f"| {n} | {took:.2f} | {1000 * took / n:.2f} |")
    finally:
        feed.close()
        stop(proc)


if __name__ == "__main__":
    main()
