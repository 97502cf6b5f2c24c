"""From a validated ScoreRequest to backend jobs (checking the server's limits), and back to a result.

The protocol module checks what a request says on its own; this module checks it against this server:
vocabulary size, max_seq_len and max_top_k. Every route that scores (the native one and the dialects
of other trainers) goes through `score_request`, so there is one scoring path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services.teacher.backends.base import Backend, BackendInfo, ScoreJob
from services.teacher.metrics import TeacherMetrics
from shared.errors import InvalidRequest, QueueFull, ServerError, TeacherError
from shared.protocol import ScoreRequest, ScoreResult, SequenceScore, Usage

log = logging.getLogger(__name__)


@dataclass
class Limits:
    vocab_size: int
    max_seq_len: int
    max_top_k: int

    @classmethod
    def of(cls, info: BackendInfo, max_top_k: int) -> Limits:
        return cls(info.vocab_size, info.max_seq_len, min(max_top_k, info.vocab_size))


def jobs_from_request(
    request: ScoreRequest,
    limits: Limits,
    want_ranks: bool = False,
    sample_temperature: float | None = None,
) -> list[ScoreJob]:
    check_top_k(request.top_k, limits)
    jobs = []
    for s, seq in enumerate(request.sequences):
        n_scored = request.scored_positions(s)
        ids = seq.prompt_ids + seq.completion_ids[:n_scored]
        if len(ids) > limits.max_seq_len:
            raise InvalidRequest(
                f"sequence {s} has {len(ids)} tokens to read (prompt {len(seq.prompt_ids)} + "
                f"scored {n_scored}); this server's max_seq_len is {limits.max_seq_len}",
                param=f"sequences.{s}",
            )
        _check_ids(seq.prompt_ids, limits.vocab_size, f"sequences.{s}.prompt_ids")
        _check_ids(
            seq.completion_ids[:n_scored], limits.vocab_size, f"sequences.{s}.completion_ids"
        )
        candidates = None
        if request.candidate_ids is not None:
            candidates = request.candidate_ids[s]
            for i, row in enumerate(candidates):
                # Scored as a [positions, widest row] matrix for the whole batch: held to top-k's
                # limit, as a candidate row is a chosen top-k.
                if len(row) > limits.max_top_k:
                    raise InvalidRequest(
                        f"{len(row)} candidate ids at one position; this server's max_top_k "
                        f"is {limits.max_top_k}",
                        param=f"candidate_ids.{s}.{i}",
                    )
                _check_ids(row, limits.vocab_size, f"candidate_ids.{s}.{i}")
        jobs.append(
            ScoreJob(
                input_ids=ids,
                n_prompt=len(seq.prompt_ids),
                top_k=request.top_k,
                candidate_ids=candidates,
                temperature=request.temperature,
                want_ranks=want_ranks,
                sample_temperature=sample_temperature,
            )
        )
    return jobs


QUEUE_POLL_S = 0.02  # how often a stream's frame looks for room in a full queue
QUEUE_WAIT_S = 60.0  # how long it looks before it is refused as /score would be (429)


async def score_as_completed(
    request: ScoreRequest,
    backend: Backend,
    limits: Limits,
    metrics: TeacherMetrics | None = None,
    queued: asyncio.Event | None = None,
) -> AsyncIterator[tuple[int, ScoreJob, SequenceScore | TeacherError]]:
    """Like score_request, but yields (index, job, score) per sequence as soon as each is done, or
    (index, job, error) for a sequence whose scoring failed: the others go on. Its sequences are
    queued together; while the queue is full this waits for room (up to QUEUE_WAIT_S, then
    QueueFull) instead of refusing at once, and a stream's reader waits too, which holds its
    client back. `queued` is set once they are queued."""
    jobs = jobs_from_request(request, limits)
    pending = await _queue_when_room(backend, jobs)
    if queued is not None:
        queued.set()
    tasks = [asyncio.ensure_future(_indexed(i, p)) for i, p in enumerate(pending)]
    try:
        for next_done in asyncio.as_completed(tasks):
            index, outcome = await next_done
            if metrics is not None and not isinstance(outcome, TeacherError):
                metrics.tokens_scored.inc(jobs[index].n_scored)
                metrics.prompt_tokens.inc(jobs[index].n_prompt)
            yield index, jobs[index], outcome
    finally:
        for task in tasks:
            task.cancel()
        _drop_unstarted(pending)  # a wrapper cancelled before it began has not passed it on


async def _queue_when_room(backend: Backend, jobs: list[ScoreJob]) -> list[Awaitable]:
    deadline = asyncio.get_running_loop().time() + QUEUE_WAIT_S
    while True:
        try:
            with failures_as_server_errors(f"queueing {len(jobs)} sequences"):
                return backend.score_each(jobs)
        except QueueFull:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(QUEUE_POLL_S)


def _drop_unstarted(pending: list[Awaitable]) -> None:
    """Cancel the queued sequences of a request that is over: those not started leave the queue."""
    for scoring in pending:
        if isinstance(scoring, asyncio.Future):
            scoring.cancel()


async def _indexed(
    index: int, pending: Awaitable[SequenceScore]
) -> tuple[int, SequenceScore | TeacherError]:
    try:
        return index, await _checked(pending, 1)
    except TeacherError as err:  # this sequence's forward failed, say: its siblings go on
        return index, err


async def score_request(
    request: ScoreRequest,
    backend: Backend,
    limits: Limits,
    metrics: TeacherMetrics | None = None,
    want_ranks: bool = False,
    sample_temperature: float | None = None,
    wait_for_room: bool = False,
) -> ScoreResult:
    """Check `request` against this server and score it on `backend`. The dialects ask for ranks,
    for a token sampled after each sequence (at `sample_temperature`), and to wait for room in a
    full queue as a stream does (their clients, as vLLM's, queue: a 429 they retry only thrice)."""
    jobs = jobs_from_request(request, limits, want_ranks, sample_temperature)
    if wait_for_room:
        pending = await _queue_when_room(backend, jobs)
        try:
            scores = await _checked(asyncio.gather(*pending), len(jobs))
        finally:  # the client went away or a sibling failed
            _drop_unstarted(pending)
    else:
        scores = await _checked(backend.score(jobs), len(jobs))
    usage = Usage(
        prompt_tokens=sum(j.n_prompt for j in jobs), scored_tokens=sum(j.n_scored for j in jobs)
    )
    if metrics is not None:
        metrics.tokens_scored.inc(usage.scored_tokens)
        metrics.prompt_tokens.inc(usage.prompt_tokens)
    info = backend.info
    return ScoreResult(info.model, info.tokenizer_fingerprint, scores, usage)


async def _checked(scoring: Awaitable, sequences: int):
    with failures_as_server_errors(f"scoring {sequences} sequences"):
        return await scoring


@contextmanager
def failures_as_server_errors(what: str) -> Iterator[None]:
    """A failure that is not one of ours (a CUDA out-of-memory in a forward, say) becomes a
    ServerError, a 500 in the error shape on /score and an error frame on /score/stream, logged
    once here."""
    try:
        yield
    except TeacherError:
        raise
    except Exception as exc:
        log.exception("%s failed", what)
        raise ServerError(f"internal error ({type(exc).__name__})") from exc


def check_top_k(top_k: int, limits: Limits) -> None:
    """Called by the dialects before they know whether anything needs scoring: a request with no
    position to score must not get past the limit and size its response by it."""
    if top_k > limits.max_top_k:
        raise InvalidRequest(
            f"top_k {top_k} exceeds this server's max_top_k {limits.max_top_k}", param="top_k"
        )


# Log-prob entries (a token's log-prob, with its id, rank or text) one response may hold. JSON
# answers are built as Python objects, up to about 280 bytes an entry with OpenAI's dicts
# (measured), so a 64 MiB body of short sequences asking for 20 each would need some 180 GB
# unchecked; at this limit a response takes at most about 2.3 GB while it is built. Far above
# what one training batch asks for (64 sequences of 2,048 tokens at 20 each: 2.8M).
MAX_RESPONSE_ENTRIES = 2**23


def check_answer_size(request: ScoreRequest) -> None:
    """/score's and a stream frame's answer: each scored position's log-prob, top-k and
    candidates. (The dialects count their own answers, in their own fields.)"""
    entries = sum(request.scored_positions(s) for s in range(len(request.sequences)))
    entries *= 1 + request.top_k
    entries += sum(len(row) for rows in request.candidate_ids or [] for row in rows)
    check_response_entries(entries, "sequences")


def check_response_entries(entries: int, where: str) -> None:
    if entries > MAX_RESPONSE_ENTRIES:
        raise InvalidRequest(
            f"this request asks for {entries:,} log-probs; a response holds at most "
            f"{MAX_RESPONSE_ENTRIES:,}: send fewer or shorter sequences a request, or ask for "
            "fewer log-probs a position",
            param=where,
        )


def check_tokens(ids: list[int], limits: Limits, where: str, extra: int = 0) -> None:
    """A dialect's token-id list, in its own words (`where`), before it becomes a ScoreRequest:
    every id inside the vocabulary, and the list with `extra` more tokens inside max_seq_len."""
    if len(ids) + extra > limits.max_seq_len:
        more = f" (+{extra} to generate)" if extra else ""
        raise InvalidRequest(
            f"{where} has {len(ids)} tokens{more}; this server's max_seq_len is "
            f"{limits.max_seq_len}",
            param=where,
        )
    _check_ids(ids, limits.vocab_size, where)


def _check_ids(ids: list[int], vocab_size: int, where: str) -> None:
    if ids and max(ids) >= vocab_size:
        bad = next(i for i in ids if i >= vocab_size)
        raise InvalidRequest(
            f"{where}: token id {bad} is out of range (vocab_size {vocab_size})", param=where
        )
