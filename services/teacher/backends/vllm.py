"""The vLLM backend: an in-process AsyncLLM engine, so concurrent HTTP requests are batched by vLLM's
own scheduler. Scores are vLLM prompt log-probs of the completion positions.

The traps this handles: `max_logprobs` is raised to the server's --max-top-k (vLLM's default is 20);
prompt log-probs are raw (vLLM does not apply a temperature to them), so temperature != 1 is refused
with a 422 rather than silently ignored; --max-batch-tokens bounds vLLM's batches, since its start-up
memory profile ignores log-prob memory; flat log-probs keep per-position Python objects out.
Chosen candidate ids use vLLM's `prompt_logprob_token_ids`, which needs its V2 model runner
(VLLM_USE_V2_MODEL_RUNNER=1); without it candidate_ids are refused with a 422 that says so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import uuid

import numpy as np
from transformers import AutoConfig

from opd.models import generation_config, load_tokenizer, stop_token_ids
from services.teacher.admission import Admission, Place
from services.teacher.backends.base import Backend, BackendInfo, ScoreJob
from shared.errors import InvalidRequest
from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import SequenceScore

log = logging.getLogger(__name__)


class VLLMBackend(Backend):
    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        max_seq_len: int | None = None,
        max_top_k: int = 20,
        max_batch_tokens: int = 16384,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        trust_remote_code: bool = False,
        max_queue_tokens: int | None = None,
    ):
        self.model_path = model_path
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.max_top_k = max_top_k
        self.max_batch_tokens = max_batch_tokens
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.trust_remote_code = trust_remote_code
        self.engine = None
        # vLLM queues whatever it is given; this holds it to the hf backend's limit: tokens sent to
        # the engine and not yet scored.
        self._admission = Admission(max_queue_tokens or 8 * max_batch_tokens)

    def load(self) -> BackendInfo:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = load_tokenizer(self.model_path, self.trust_remote_code)
        args = AsyncEngineArgs(
            model=self.model_path,
            dtype=self.dtype,
            max_model_len=self._max_model_len(),
            max_logprobs=max(self.max_top_k, 1),
            max_num_batched_tokens=self.max_batch_tokens,
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            trust_remote_code=self.trust_remote_code,
            # prompt log-probs bypass the prefix cache anyway; keep memory for batches.
            enable_prefix_caching=False,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        config = self.engine.model_config
        self.candidates_supported = os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1"
        self.info = BackendInfo(
            model=str(self.model_path),
            backend="vllm",
            dtype=self.dtype,
            device=str(self.engine.vllm_config.device_config.device_type),
            vocab_size=config.get_vocab_size(),
            max_seq_len=config.max_model_len - 1,
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            stop_token_ids=stop_token_ids(
                generation_config(self.model_path, self.trust_remote_code), self.tokenizer
            ),
        )
        return self.info

    def _max_model_len(self) -> int | None:
        """vLLM generates at least one token after the prompt, so scoring N tokens takes N + 1
        positions: ask for one more than --max-seq-len, within the model's positions (the served
        limit, max_model_len - 1, is then what /info reports)."""
        if not self.max_seq_len:
            return None
        config = AutoConfig.from_pretrained(
            self.model_path, trust_remote_code=self.trust_remote_code
        )
        positions = getattr(config, "max_position_embeddings", None)
        if positions and self.max_seq_len + 1 > positions:
            log.warning(
                "max_seq_len %d takes %d positions with vLLM (it generates a token after the "
                "prompt) and the model has %d: serving %d",
                self.max_seq_len,
                self.max_seq_len + 1,
                positions,
                positions - 1,
            )
            return positions
        return self.max_seq_len + 1

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    async def score(self, jobs: list[ScoreJob]) -> list[SequenceScore]:
        tasks = self.score_each(jobs)
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # one refused, or the caller gone: the engine aborts the others' requests
            for task in tasks:
                task.cancel()

    def score_each(self, jobs: list[ScoreJob]) -> list[asyncio.Future]:
        self._refuse_unsupported(jobs)
        places = self._admission.admit(jobs)
        tasks = []
        for job, place in zip(jobs, places):
            task = asyncio.ensure_future(self._score_in_place(job, place))
            place.release_when_cancelled(task)  # a task cancelled before it starts runs no finally
            tasks.append(task)
        return tasks

    def queue_depth(self) -> int:
        # vLLM schedules what it is given itself: waiting and running look alike from here.
        return self._admission.sequences

    async def _score_in_place(self, job: ScoreJob, place: Place) -> SequenceScore:
        try:
            return await self._score(job)
        finally:
            place.release()

    def _refuse_unsupported(self, jobs: list[ScoreJob]) -> None:
        for job in jobs:  # refuse before any work starts
            if job.temperature != 1.0:
                raise InvalidRequest(
                    "the vllm backend returns raw prompt log-probs: temperature must be 1.0 "
                    "(use the hf backend for other temperatures)",
                    param="temperature",
                )
            if job.candidate_ids is not None and not self.candidates_supported:
                raise InvalidRequest(
                    "this vllm backend cannot score chosen ids: start the server with "
                    "VLLM_USE_V2_MODEL_RUNNER=1, or use the hf backend",
                    param="candidate_ids",
                )

    async def _score(self, job: ScoreJob) -> SequenceScore:
        from vllm import SamplingParams

        # A sampled token after the sequence (OpenAI max_tokens=1) is a real generation step: the
        # last input id is then a placeholder for it, and is not sent.
        generating = job.sample_temperature is not None
        ids = job.input_ids[:-1] if generating else job.input_ids
        start = job.n_prompt - 1  # the row that predicts the first completion token
        params = SamplingParams(
            max_tokens=1,
            temperature=job.sample_temperature or 0.0,
            prompt_logprobs=job.top_k,
            logprobs=job.top_k if generating else None,
            flat_logprobs=True,
            detokenize=False,
        )
        if job.candidate_ids is not None:
            width = max(1, max(len(row) for row in job.candidate_ids))
            matrix = np.full((len(job.candidate_ids), width), -1, dtype=np.int64)
            for i, row in enumerate(job.candidate_ids):
                matrix[i, : len(row)] = row
            params.prompt_logprob_token_ids = matrix[: len(ids) - 1 - start]
            params.prompt_logprob_start = start  # vLLM allows a start only with chosen ids
        from vllm.exceptions import VLLMValidationError

        final = None
        try:
            async for output in self.engine.generate(
                {"prompt_token_ids": ids}, params, request_id=uuid.uuid4().hex
            ):
                final = output
        except VLLMValidationError as exc:  # what vLLM refuses is the request's fault: a 422
            raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from None
        # Python work per scored position (top-k rows especially: 44 ms for 2,048 positions at
        # top_k 20): in a thread, so this loop, vLLM's output handler's too, goes on meanwhile.
        return await asyncio.to_thread(self._to_score, job, ids, final, generating)

    def _to_score(self, job: ScoreJob, ids: list[int], final, generating: bool) -> SequenceScore:
        score = None
        if not (generating or job.want_ranks):  # /score's case: read the flat arrays at once
            score = flat_score(final.prompt_logprobs, ids, job.n_prompt, job.top_k)
        if score is None:
            score = _score_by_rows(job, ids, final, generating)
        if job.candidate_ids is not None:
            scored = np.asarray(final.prompt_token_id_logprobs, dtype=np.float32)
            score.candidate_logprobs = [
                scored[i, : len(c)] for i, c in enumerate(job.candidate_ids)
            ]
        return score


def flat_score(logprobs, ids: list[int], n_prompt: int, k: int) -> SequenceScore | None:
    """The scores of `ids`' completion positions read from vLLM's FlatLogprobs as arrays, with no
    Python work per position (which took 44 ms per 2,048 positions at top_k 20). Each position
    holds the actual token, then the top-k by rank (vLLM's `append_fast`). None where the layout is
    any other (dict log-probs, or rows of another width or actual token), which _rows reads."""
    if not hasattr(logprobs, "start_indices"):
        return None
    first = n_prompt - (len(ids) - len(logprobs.start_indices))  # the first scored position's row
    if first < 0 or n_prompt == len(ids):  # fewer rows than positions, or none to score
        return None
    begin = np.asarray(logprobs.start_indices[first:], dtype=np.int64)
    end = np.asarray(logprobs.end_indices[first:], dtype=np.int64)
    if ((end - begin) != 1 + k).any():
        return None
    at_N_W = begin[:, None] + np.arange(1 + k)[None, :]
    token_ids = np.asarray(logprobs.token_ids, dtype=np.int64)[at_N_W]
    if not np.array_equal(token_ids[:, 0], ids[n_prompt:]):
        return None
    values = np.asarray(logprobs.logprobs, dtype=np.float64)[at_N_W]
    values = np.where(np.isnan(values), -np.inf, values).astype(np.float32)  # as _finite
    score = SequenceScore(logprobs=np.ascontiguousarray(values[:, 0]))
    if k:
        score.topk_ids = np.ascontiguousarray(token_ids[:, 1:], dtype=np.int32)
        score.topk_logprobs = np.ascontiguousarray(values[:, 1:])
    return score


def _score_by_rows(job: ScoreJob, ids: list[int], final, generating: bool) -> SequenceScore:
    """The scores through one {token: (logprob, rank)} row per position: any layout, ranks, and a
    generated token's row."""
    rows = _rows(final.prompt_logprobs, len(ids), job.n_prompt)  # one per scored token
    targets = ids[job.n_prompt :]
    if generating:  # the placeholder's row: the distribution of the generated token
        sample = final.outputs[0]
        rows.append(_rows(sample.logprobs, 1)[0])
        token = sample.token_ids[0]
        job_sampled = (token, rows[-1][token][0])
        targets = [*targets, token]
    k = job.top_k
    logprobs = np.array([row[t][0] for row, t in zip(rows, targets)], dtype=np.float32)
    score = SequenceScore(logprobs=logprobs)
    if k:
        ranked = [sorted(row.items(), key=lambda kv: kv[1][1])[:k] for row in rows]
        score.topk_ids = np.array([[t for t, _ in r] for r in ranked], dtype=np.int32)
        score.topk_logprobs = np.array([[v[0] for _, v in r] for r in ranked], dtype=np.float32)
    if job.want_ranks:
        score.ranks = np.array([row[t][1] for row, t in zip(rows, targets)], dtype=np.int64)
    if generating:
        score.sampled = job_sampled
    return score


def _rows(logprobs, length: int, start: int = 0) -> list[dict[int, tuple[float, int]]]:
    """vLLM's (flat or dict) log-probs as one {token: (logprob, rank)} per position of `start` ..
    `length` - 1, with empty dicts where vLLM returned none (positions before `start`, the
    prompt's, are never converted)."""
    out: list[dict[int, tuple[float, int]]] = [{} for _ in range(length - start)]
    if logprobs is None:
        return out
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        offset = length - len(logprobs.start_indices)
        for p in range(max(0, start - offset), len(logprobs.start_indices)):
            a, b = logprobs.start_indices[p], logprobs.end_indices[p]
            out[offset + p - start] = {
                logprobs.token_ids[i]: (_finite(logprobs.logprobs[i]), logprobs.ranks[i] or 0)
                for i in range(a, b)
            }
        return out
    offset = length - len(logprobs)
    for p in range(max(0, start - offset), len(logprobs)):
        if position := logprobs[p]:
            out[offset + p - start] = {
                t: (_finite(lp.logprob), lp.rank or 0) for t, lp in position.items()
            }
    return out


def _finite(x: float) -> float:
    return x if not math.isnan(x) else -math.inf
