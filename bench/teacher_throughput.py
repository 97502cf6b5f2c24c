"""Teacher scoring throughput: the hf backend in-process vs over HTTP (JSON and binary), measured
side by side in one run, plus wire bytes per scored token.

    python bench/teacher_throughput.py                        # bundled tiny teacher, CPU
    python bench/teacher_throughput.py --random-init qwen2-1.5b --device cuda --dtype bfloat16

Each row scores the same batch of sequences (`batch` sequences of `seq_len` tokens, the last
`completion` of them scored) `repeats` times with `concurrency` requests in flight; tokens/s counts
scored positions. The HTTP server runs in its own process, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from opd.bundled import TEACHER_PATH  # noqa: E402
from opd.models import ModelLoadError, check_loadable  # noqa: E402
from services.teacher.backends.base import ScoreJob  # noqa: E402
from services.teacher.backends.hf import HFBackend  # noqa: E402
from services.teacher.process import start_teacher, stop  # noqa: E402
from shared.client import AsyncTeacherClient  # noqa: E402
from shared.flags import positive_int  # noqa: E402
from shared.protocol import ScoreRequest, encode_request  # noqa: E402

# Shapes of real models, for random-init runs on a GPU (no hub: weights are random).
SHAPES = {
    "qwen2-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "qwen2-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
}


def random_model(shape: str, dtype: str) -> str:
    """Save a random-init Qwen2-shaped model with the bundled tokenizer; returns its folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from shared.tokenizer import build_tokenizer

    folder = Path(tempfile.mkdtemp(prefix=f"{shape}-"))
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # build in the target dtype: half the memory
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    del model
    build_tokenizer().save_pretrained(folder)
    return str(folder)


def make_sequences(batch: int, seq_len: int, completion: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, seq_len), generator=g).tolist()
    return [(row[: seq_len - completion], row[seq_len - completion :]) for row in ids]


def jobs_of(seqs, top_k: int) -> list[ScoreJob]:
    return [ScoreJob(p + c, len(p), top_k=top_k) for p, c in seqs]


def bench_in_process(backend: HFBackend, seqs, top_k: int, repeats: int) -> float:
    jobs = jobs_of(seqs, top_k)
    backend.score_batch(jobs)  # warm-up
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        backend.score_batch(jobs)
    _sync()
    return repeats * sum(j.n_scored for j in jobs) / (time.perf_counter() - start)


def bench_http(url: str, seqs, top_k: int, repeats: int, concurrency: int, binary: bool) -> float:
    async def go() -> float:
        async with AsyncTeacherClient(url, binary=binary, timeout=600) as client:
            await client.score(seqs, top_k=top_k)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                await asyncio.gather(*(client.score(seqs, top_k=top_k) for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
        return repeats * concurrency * sum(len(c) for _, c in seqs) / elapsed

    return asyncio.run(go())


def wire_bytes(backend: HFBackend, seqs, top_k: int) -> dict:
    from shared.protocol import ScoreResult, Usage, encode_response

    request = ScoreRequest(
        sequences=[{"prompt_ids": p, "completion_ids": c} for p, c in seqs], top_k=top_k
    )
    scores = backend.score_batch(jobs_of(seqs, top_k))
    result = ScoreResult("m", "f", scores, Usage(prompt_tokens=0, scored_tokens=0))
    n = sum(len(c) for _, c in seqs)
    return {
        form: (len(encode_request(request, b)) + len(encode_response(result, b))) / n
        for form, b in (("json", False), ("binary", True))
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def flops_per_token(backend: HFBackend, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x matmul parameters, plus attention over the sequence."""
    cfg = backend.model.config
    params = sum(p.numel() for n, p in backend.model.named_parameters() if "embed_tokens" not in n)
    attention = 2 * cfg.num_hidden_layers * seq_len * cfg.hidden_size  # QK^T and AV, causal average
    return 2 * params + attention


def add_workload_flags(parser: argparse.ArgumentParser) -> None:
    """The model and the sequences to score (shared with bench/backends.py)."""
    parser.add_argument(
        "--model", default=str(TEACHER_PATH), help="teacher folder (default: bundled)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence")
    parser.add_argument(
        "--completion", type=positive_int, default=224, help="scored tokens per sequence"
    )
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[8, 32, 64])


def check_workload(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.completion >= args.seq_len:
        parser.error(f"--completion {args.completion} must be below --seq-len {args.seq_len}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_flags(parser)
    parser.add_argument(
        "--random-init", choices=sorted(SHAPES), help="random weights of this shape"
    )
    parser.add_argument(
        "--concurrency", type=positive_int, nargs="+", default=[1, 4], help="requests in flight"
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per row")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="device bf16 peak for MFU (e.g. 989 on an H100 or H200 SXM)",
    )
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    check_workload(parser, args)
    if not args.random_init:
        try:
            check_loadable(args.model, args.device)
        except ModelLoadError as exc:
            parser.error(f"--model {exc}")

    torch.set_num_threads(args.threads)
    model = random_model(args.random_init, args.dtype) if args.random_init else args.model
    max_batch_tokens = max(args.batches) * args.seq_len
    backend = HFBackend(
        model,
        device=args.device,
        dtype=args.dtype,
        max_batch_tokens=max_batch_tokens,
        max_seq_len=args.seq_len,
    )
    backend.load()
    vocab = backend.info.vocab_size
    proc, url = start_teacher(
        model,
        threads=args.threads,
        ready_timeout=600,
        extra_args=(
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--max-batch-tokens",
            str(max_batch_tokens),
            "--max-seq-len",
            str(args.seq_len),
            "--max-top-k",
            "20",
        ),
    )
    rows = []
    try:
        for batch in args.batches:
            seqs = make_sequences(batch, args.seq_len, args.completion, vocab)
            local = bench_in_process(backend, seqs, 0, args.repeats)
            for conc in args.concurrency:
                row = {
                    "batch": batch,
                    "tokens": batch * args.seq_len,
                    "concurrency": conc,
                    "in_process": local,
                }
                for form, binary in (("json", False), ("binary", True)):
                    row[form] = bench_http(url, seqs, 0, args.repeats, conc, binary)
                rows.append(row)
                # MFU counts every token the forward computed (prompt too), not just scored ones.
                all_tokens_per_scored = args.seq_len / args.completion
                _print_row(
                    row,
                    flops_per_token(backend, args.seq_len) * all_tokens_per_scored,
                    args.peak_tflops,
                )
        sizes = {
            k: wire_bytes(backend, make_sequences(8, args.seq_len, args.completion, vocab), k)
            for k in (0, 20)
        }
    finally:
        stop(proc)
    print("\nwire bytes per scored token (request + response):")
    for k, forms in sizes.items():
        print(f"  top_k {k:>2}: json {forms['json']:.1f}, binary {forms['binary']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "wire_bytes": sizes}, indent=1))


_header_printed = False


def _print_row(row: dict, flops_tok: float, peak_tflops: float) -> None:
    global _header_printed
    if not _header_printed:
        print(
            f"{'batch':>5} {'tokens':>7} {'conc':>4} {'in-proc tok/s':>14} {'json tok/s':>11} "
            f"{'binary tok/s':>13} {'json/in':>8} {'binary/in':>10}"
            + (f" {'MFU in-proc':>11}" if peak_tflops else "")
        )
        _header_printed = True
    line = (
        f"{row['batch']:>5} {row['tokens']:>7} {row['concurrency']:>4} "
        f"{row['in_process']:>14,.0f} {row['json']:>11,.0f} {row['binary']:>13,.0f} "
        f"{row['json'] / row['in_process']:>8.2f} {row['binary'] / row['in_process']:>10.2f}"
    )
    if peak_tflops:
        line += f" {row['in_process'] * flops_tok / (peak_tflops * 1e12):>11.2f}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
