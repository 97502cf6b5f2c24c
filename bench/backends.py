"""hf vs vllm teacher backends, side by side in one run: scored tokens/s over HTTP (binary), each
server in its own process with the same model, threads and batches.

    .venv-vllm/bin/python bench/backends.py                       # bundled teacher on CPU (vllm-cpu)
    python bench/backends.py --model /models/Qwen3-8B --device cuda --dtype bfloat16 \\
        --seq-len 2048 --completion 1792 --batches 8 32            # a real model on a GPU machine
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.teacher_throughput import (  # noqa: E402
    add_workload_flags,
    bench_http,
    check_workload,
    make_sequences,
)
from services.teacher.process import start_teacher, stop  # noqa: E402
from shared.flags import non_negative_int, positive_int  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_flags(parser)
    parser.add_argument("--concurrency", type=positive_int, default=2, help="requests in flight")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="teacher top-k")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per row")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads per server")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    # Both halves or none: without vLLM the comparison this script exists for cannot be made.
    if importlib.util.find_spec("vllm") is None:
        parser.error("needs vLLM importable (run it with .venv-vllm/bin/python; see the README)")
    check_workload(parser, args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    common = (
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--max-seq-len",
        str(args.seq_len),
        "--max-batch-tokens",
        str(max(args.batches) * args.seq_len),
    )
    results: dict[str, dict[int, float]] = {}
    for backend in ("hf", "vllm"):
        proc, url = start_teacher(
            args.model,
            threads=args.threads,
            ready_timeout=600,
            extra_args=("--backend", backend, *common),
        )
        try:
            results[backend] = {
                b: bench_http(
                    url,
                    make_sequences(b, args.seq_len, args.completion, 20),
                    args.top_k,
                    args.repeats,
                    args.concurrency,
                    binary=True,
                )
                for b in args.batches
            }
        finally:
            stop(proc)
    rows = [
        {
            "batch": b,
            "tokens": b * args.seq_len,
            "hf_tok_s": round(results["hf"][b]),
            "vllm_tok_s": round(results["vllm"][b]),
            "vllm_over_hf": round(results["vllm"][b] / results["hf"][b], 3),
        }
        for b in args.batches
    ]
    print(f"{'batch':>5} {'tokens':>7} {'hf tok/s':>10} {'vllm tok/s':>11} {'vllm/hf':>8}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['tokens']:>7} {r['hf_tok_s']:>10,} {r['vllm_tok_s']:>11,} "
            f"{r['vllm_over_hf']:>8.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
