"""The transformers backend: a causal LM in one process (CPU or one GPU), fed by the dynamic batcher.

Memory stays bounded on long sequences and large vocabularies: the decoder runs once per batch to get
hidden states, and the output layer + log-softmax run over the scored positions in chunks of
`chunk_rows`, so the full [tokens, vocab] logits never exist at once. Sequences are right-padded with
no attention mask: under causal attention a real token never sees the padding after it, so padding
cannot change a result. A batch that holds several sequences with one prompt (a trainer's samples of
it) runs each prompt once and its completions on copies of its KV cache, when that saves enough.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from opd.models import load_model, stop_token_ids
from opd.padding import pad_id, right_pad
from services.teacher.backends.base import Backend, BackendInfo, ScoreJob
from services.teacher.batcher import Batcher
from services.teacher.metrics import TeacherMetrics
from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import SequenceScore

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger(__name__)

# Logit rows per chunk are chosen so one chunk's float32 logits take about this many bytes.
CHUNK_BYTES = 256 * 2**20


class HFBackend(Backend):
    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_tokens: int = 16384,
        max_seq_len: int | None = None,
        max_queue_tokens: int | None = None,
        trust_remote_code: bool = False,
        share_prompts: bool = True,
        metrics: TeacherMetrics | None = None,
    ):
        self.model_path = model_path
        self.device = device
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens
        self.max_seq_len = max_seq_len
        self.max_queue_tokens = max_queue_tokens or 8 * max_batch_tokens
        self.trust_remote_code = trust_remote_code
        self.share_prompts = share_prompts
        self.metrics = metrics
        self.batcher: Batcher | None = None

    def load(self) -> BackendInfo:
        model, tokenizer = load_model(
            self.model_path, DTYPES[self.dtype], self.device, self.trust_remote_code
        )
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = model.get_decoder()
        self.output_logits = OutputLogits(model)
        check_output_logits(model, self.decoder, self.output_logits)
        self.cache_arg = cache_argument(self.decoder) if self.share_prompts else None
        if kind := rope_that_follows_the_batch(model.config):
            log.warning(
                "%s uses %s RoPE, whose frequencies follow the longest position in a batch: a "
                "sequence's log-probs can then depend on the sequences batched with it (padding "
                "does not change a result only for other position encodings)",
                self.model_path,
                kind,
            )
        self.pad_id = pad_id(tokenizer)
        vocab = self.output_logits.head.weight.shape[0]
        self.chunk_rows = max(1, CHUNK_BYTES // (4 * vocab))
        # Capped by the model's positions, as the vllm backend is: beyond them a model with learned
        # position embeddings fails, taking every request batched with the long one down with it.
        positions = getattr(model.config, "max_position_embeddings", None) or self.max_batch_tokens
        max_len = min(self.max_seq_len or self.max_batch_tokens, positions)
        if self.max_seq_len and self.max_seq_len > positions:
            log.warning(
                "max_seq_len %d is beyond the model's %d positions: serving %d",
                self.max_seq_len,
                positions,
                positions,
            )
        if max_len > self.max_batch_tokens:
            raise ValueError(
                f"max_seq_len {max_len} exceeds max_batch_tokens {self.max_batch_tokens}: "
                "one sequence must fit in one batch"
            )
        self.info = BackendInfo(
            model=str(self.model_path),
            backend="hf",
            dtype=self.dtype,
            device=self.device,
            vocab_size=vocab,
            max_seq_len=max_len,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            stop_token_ids=stop_token_ids(model.generation_config, tokenizer),
        )
        return self.info

    async def start(self) -> None:
        self.batcher = Batcher(
            self.score_batch, self.max_batch_tokens, self.max_queue_tokens, self.metrics
        )
        self.batcher.start()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()

    async def score(self, jobs: list[ScoreJob]) -> list[SequenceScore]:
        assert self.batcher is not None, "start() first"
        return await self.batcher.submit(jobs)

    def score_each(self, jobs: list[ScoreJob]) -> list[asyncio.Future]:
        assert self.batcher is not None, "start() first"
        return self.batcher.admit(jobs)

    def queue_depth(self) -> int:
        return self.batcher.depth() if self.batcher else 0

    @torch.inference_mode()
    def score_batch(self, jobs: list[ScoreJob]) -> list[SequenceScore]:
        """Score a batch (called from the batcher's worker thread): the decoder's hidden states at
        each job's scored positions, then the output layer over them in chunks."""
        rows = None
        if (
            self.cache_arg
            and all(j.n_scored for j in jobs)
            and worth_sharing(jobs)
            and shared_pass_fits(jobs, self.max_batch_tokens)
        ):
            try:
                rows = self._rows_sharing_prompts(jobs)
            except Exception as exc:
                if not out_of_memory(exc):  # a model the shared pass does not fit: never again
                    log.warning("sharing prompts is off for this model: %s", exc)
                    self.cache_arg = None
                # else the cache's copies did not fit: this batch takes the lean pass
        if rows is None:
            rows = self._rows(jobs)
        targets = torch.tensor([t for j in jobs for t in j.input_ids[j.n_prompt :]])
        return chunked_scores(
            torch.cat(rows),
            self.output_logits,
            targets.to(self.model.device),
            jobs,
            self.chunk_rows,
        )

    def _rows(self, jobs: list[ScoreJob]) -> list[torch.Tensor]:
        """Each job's hidden states at the positions that predict its scored tokens, from one
        decoder pass over the right-padded sequences."""
        ids_B_T = right_pad([j.input_ids for j in jobs], self.pad_id).to(self.model.device)
        hidden_B_T_H = self.decoder(input_ids=ids_B_T, use_cache=False).last_hidden_state
        # Position t predicts token t+1: the scored tokens of job b sit at n_prompt .. len-1.
        return [hidden_B_T_H[b, j.n_prompt - 1 : len(j.input_ids) - 1] for b, j in enumerate(jobs)]

    def _rows_sharing_prompts(self, jobs: list[ScoreJob]) -> list[torch.Tensor]:
        """As _rows, but each distinct prompt runs through the decoder once: a trainer sends several
        samples of each prompt, and at short horizons the prompts are much of the work. The
        completions then run on copies of their prompt's KV cache, with a mask that hides the
        padding between a shorter prompt and its completion, at positions that continue their
        prompt's. Every job scores at least one token."""
        device = self.model.device
        prompts: dict[tuple[int, ...], int] = {}
        owner = [prompts.setdefault(tuple(j.input_ids[: j.n_prompt]), len(prompts)) for j in jobs]
        width = max(len(p) for p in prompts)
        prompt_out = self.decoder(
            input_ids=right_pad(list(prompts), self.pad_id).to(device), use_cache=True
        )
        cache = getattr(prompt_out, self.cache_arg)
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            # A sliding window keeps the padded prompt's last slots, not each prompt's own, and a
            # recurrent state would carry the padding: only plain attention layers can be shared.
            names = sorted({type(layer).__name__ for layer in layers or []})
            raise ValueError(f"its KV cache holds {names or 'no layers'}, not only DynamicLayer")
        cache.batch_select_indices(torch.tensor(owner, device=device))
        tails = [j.input_ids[j.n_prompt :] for j in jobs]
        tail_ids = right_pad(tails, self.pad_id)
        n_prompt_B = torch.tensor([j.n_prompt for j in jobs])
        n_tail_B = torch.tensor([len(t) for t in tails])
        # Padding repeats the last real position, so no position passes the model's last one.
        steps_B_T = torch.minimum(torch.arange(tail_ids.shape[1])[None, :], (n_tail_B - 1)[:, None])
        seen_B_L = torch.ones(len(jobs), width + tail_ids.shape[1], dtype=torch.long)
        seen_B_L[:, :width] = (torch.arange(width)[None, :] < n_prompt_B[:, None]).long()
        tail_B_T_H = self.decoder(
            input_ids=tail_ids.to(device),
            attention_mask=seen_B_L.to(device),
            position_ids=(n_prompt_B[:, None] + steps_B_T).to(device),
            **{self.cache_arg: cache},
        ).last_hidden_state
        prompt_U_P_H = prompt_out.last_hidden_state
        # The prompt's last position predicts the first completion token; each completion token
        # but the last predicts the next.
        return [
            torch.cat(
                [
                    prompt_U_P_H[owner[b], j.n_prompt - 1 : j.n_prompt],
                    tail_B_T_H[b, : j.n_scored - 1],
                ]
            )
            for b, j in enumerate(jobs)
        ]


# The share of a batch's tokens that running each prompt once must save to be worth its second pass.
MIN_SAVED_SHARE = 0.1


def worth_sharing(jobs: list[ScoreJob]) -> bool:
    """Whether the prompts that several jobs share are enough of the batch to run them once: a
    trainer's samples are, while a batch of whole sequences scored after a shared <bos> (a TRL
    dialect request on its own) saves nothing and keeps the one pass, so its numbers stay those of
    /score's."""
    distinct = {tuple(j.input_ids[: j.n_prompt]) for j in jobs}
    saved = sum(j.n_prompt for j in jobs) - sum(len(p) for p in distinct)
    return saved >= MIN_SAVED_SHARE * sum(len(j.input_ids) for j in jobs)


def out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: CUDA's is an OutOfMemoryError, the CPU allocator's a RuntimeError
    ("DefaultCPUAllocator: can't allocate memory"), Python's own a MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "allocate" in str(exc)


def shared_pass_fits(jobs: list[ScoreJob], max_batch_tokens: int) -> bool:
    """Whether the shared pass keeps the batch within `max_batch_tokens`: each of its rows holds
    the longest prompt's and the longest completion's slots, which may be from different jobs, so
    it can need more than the padded batch the batcher packed (rows x longest sequence)."""
    width = max(j.n_prompt for j in jobs)
    tail = max(j.n_scored for j in jobs)
    return len(jobs) * (width + tail) <= max_batch_tokens


def cache_argument(decoder) -> str | None:
    """What the decoder calls its KV cache (`cache` in transformers >= 5.2x, `past_key_values`
    before), or None for a model that takes none and so cannot share prompts."""
    params = inspect.signature(decoder.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


class OutputLogits:
    """The model's logits from its decoder's hidden states, as its own forward finishes them: some
    families change them after the output layer (Cohere scales them, Granite divides them, Gemma 2
    and 3 cap them), and the scores must be the model's own, as vLLM's are."""

    def __init__(self, model: torch.nn.Module):
        self.head = model.get_output_embeddings()
        config = model.config.get_text_config()
        self.scale = (getattr(config, "logit_scale", None) or 1.0) / (
            getattr(config, "logits_scaling", None) or 1.0
        )
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@torch.inference_mode()
def check_output_logits(model, decoder, output_logits: OutputLogits) -> None:
    """Refuse a model whose forward changes its logits in a way OutputLogits does not know: its
    scores would be quietly wrong. One short forward both ways, at load."""
    vocab = output_logits.head.weight.shape[0]
    ids = (torch.arange(1, 9) % vocab)[None].to(model.device)
    want = model(input_ids=ids, use_cache=False).logits.float()
    got = output_logits(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
    tolerance = 1e-3 * max(1.0, want.abs().max().item())
    if not torch.allclose(got, want, rtol=1e-3, atol=tolerance):
        raise ValueError(
            f"{type(model).__name__} changes its logits after the output layer in a way the hf "
            f"backend does not reproduce (differing by up to {(got - want).abs().max():.3g}); "
            "serve it with --backend vllm"
        )


def vocab_rank(logp_C_V: torch.Tensor, target_logp_C1: torch.Tensor) -> torch.Tensor:
    """Each target's rank in its row, 1 for the likeliest, as vLLM counts it: the tokens at least as
    likely as the target, so a target tied with others takes the last of their ranks (ties are
    common in bf16)."""
    return (logp_C_V >= target_logp_C1).sum(-1)


def top_k_by_value_then_id(logp_C_V: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k likeliest tokens of each row, ordered by log-prob and, among equal ones (common in
    bf16), by lowest id, the k-th place's ties settled the same way. torch.topk leaves both orders
    to its kernel and to k, so a request's top-k would change with the top_k of the requests
    batched beside it. Each row's top-k is then the first k of its top-(k + j)."""
    # One more than asked: where the (k+1)-th ties with the k-th, which of the tied tokens made the
    # cut is the kernel's choice (a whole-row comparison would cost twice the topk itself).
    wider = min(k + 1, logp_C_V.shape[-1])
    values_C_W, ids_C_W = logp_C_V.topk(wider, dim=-1)
    values_C_K, ids_C_K = values_C_W[:, :k].contiguous(), ids_C_W[:, :k].contiguous()
    kth_C1 = values_C_K[:, -1:]
    open_rows = (values_C_W[:, -1] == kth_C1[:, 0]).nonzero().flatten() if wider > k else []
    if len(open_rows):
        rows_R_V, kth_R1 = logp_C_V[open_rows], kth_C1[open_rows]
        above_R_V, tied_R_V = rows_R_V > kth_R1, rows_R_V == kth_R1
        room_R1 = k - above_R_V.sum(-1, keepdim=True)
        taken_R_V = above_R_V | (tied_R_V & (tied_R_V.cumsum(-1) <= room_R1))
        ids_R_K = taken_R_V.nonzero()[:, 1].view(len(open_rows), k)  # ascending ids
        ids_C_K[open_rows] = ids_R_K
        values_C_K[open_rows] = rows_R_V.gather(1, ids_R_K)
    by_id_C_K = ids_C_K.argsort(dim=-1)
    ids_C_K, values_C_K = ids_C_K.gather(1, by_id_C_K), values_C_K.gather(1, by_id_C_K)
    by_value_C_K = values_C_K.argsort(dim=-1, descending=True, stable=True)
    return values_C_K.gather(1, by_value_C_K), ids_C_K.gather(1, by_value_C_K)


def chunked_scores(
    hidden_N_H: torch.Tensor,
    output_logits: OutputLogits,
    targets_N: torch.Tensor,
    jobs: list[ScoreJob],
    chunk_rows: int,
) -> list[SequenceScore]:
    """Log-probs of `targets_N` (plus top-k and candidates) from hidden states, chunk by chunk.

    Rows are the jobs' scored positions, concatenated in job order. Each job has its own temperature,
    top_k and candidates, so these are expanded to per-row tensors first.
    """
    return _split_by_job(_score_rows(hidden_N_H, output_logits, targets_N, jobs, chunk_rows), jobs)


# RoPE kinds whose frequencies transformers picks from the batch's longest position.
BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_that_follows_the_batch(config) -> str | None:
    """The model's RoPE kind if it is one whose frequencies follow the longest position in the
    batch (in rope_parameters, per layer type too, or an older config's rope_scaling)."""
    found = [getattr(config, name, None) for name in ("rope_parameters", "rope_scaling")]
    while found:
        params = found.pop()
        if isinstance(params, dict):
            kind = params.get("rope_type") or params.get("type")
            if kind in BATCH_DEPENDENT_ROPE:
                return kind
            found += [v for v in params.values() if isinstance(v, dict)]
    return None


@dataclass
class _RowScores:
    """Every row's scores, on the CPU: what the jobs want of them, for all jobs at once."""

    logprobs: np.ndarray
    topk_values: np.ndarray | None
    topk_ids: np.ndarray | None
    candidates: np.ndarray | None  # [N, C], each row padded to the most candidates of any row
    candidate_counts: list[int] | None
    ranks: np.ndarray | None
    sampled: dict[int, tuple[int, float]]  # row -> (token, its log-prob), last rows of some jobs


def _score_rows(
    hidden_N_H: torch.Tensor,
    output_logits: OutputLogits,
    targets_N: torch.Tensor,
    jobs: list[ScoreJob],
    chunk_rows: int,
) -> _RowScores:
    device = hidden_N_H.device
    temps_N = torch.cat(
        [torch.full((j.n_scored,), j.temperature, dtype=torch.float32) for j in jobs]
    ).to(device)
    k = max(j.top_k for j in jobs)
    cand_N_C, cand_mask_N_C = _candidate_matrix(jobs, device)
    want_ranks = any(j.want_ranks for j in jobs)
    last_rows = torch.tensor([j.n_scored for j in jobs]).cumsum(0) - 1
    sample_at = {
        int(r): j.sample_temperature
        for r, j in zip(last_rows, jobs)
        if j.sample_temperature is not None
    }
    sampled: dict[int, tuple[int, float]] = {}
    logprobs, topk_vals, topk_ids, cand_vals, ranks = [], [], [], [], []
    for start in range(0, hidden_N_H.shape[0], chunk_rows):
        end = start + chunk_rows
        logits = output_logits(hidden_N_H[start:end]).float() / temps_N[start:end, None]
        logp_C_V = torch.log_softmax(logits, dim=-1)
        target_logp = logp_C_V.gather(1, targets_N[start:end, None])
        logprobs.append(target_logp.squeeze(1))
        if want_ranks:
            ranks.append(vocab_rank(logp_C_V, target_logp))
        if k:
            values, ids = top_k_by_value_then_id(logp_C_V, k)
            topk_vals.append(values)
            topk_ids.append(ids)
        if cand_N_C is not None:
            cand_vals.append(logp_C_V.gather(1, cand_N_C[start:end]))
        for row in (r for r in sample_at if start <= r < end):
            # logp / T has the softmax of logits / T: the request's sampling temperature.
            probs = torch.softmax(logp_C_V[row - start] / sample_at[row], dim=-1)
            token = int(torch.multinomial(probs, 1))
            sampled[row] = (token, float(logp_C_V[row - start, token]))
    return _RowScores(
        logprobs=torch.cat(logprobs).cpu().numpy(),
        topk_values=torch.cat(topk_vals).cpu().numpy() if k else None,
        topk_ids=torch.cat(topk_ids).to(torch.int32).cpu().numpy() if k else None,
        candidates=torch.cat(cand_vals).cpu().numpy() if cand_N_C is not None else None,
        candidate_counts=cand_mask_N_C.sum(1).tolist() if cand_mask_N_C is not None else None,
        ranks=torch.cat(ranks).cpu().numpy() if want_ranks else None,
        sampled=sampled,
    )


def _split_by_job(scored: _RowScores, jobs: list[ScoreJob]) -> list[SequenceScore]:
    """Each job's rows of `scored`, with only what it asked for (its own top_k, not the batch's)."""
    out, offset = [], 0
    for job in jobs:
        rows = slice(offset, offset + job.n_scored)
        score = SequenceScore(logprobs=scored.logprobs[rows])
        if job.top_k:
            score.topk_ids = scored.topk_ids[rows, : job.top_k]
            score.topk_logprobs = scored.topk_values[rows, : job.top_k]
        if job.want_ranks:
            score.ranks = scored.ranks[rows]
        score.sampled = scored.sampled.get(offset + job.n_scored - 1)
        if job.candidate_ids is not None:
            score.candidate_logprobs = [
                scored.candidates[offset + i, : scored.candidate_counts[offset + i]]
                for i in range(job.n_scored)
            ]
        out.append(score)
        offset += job.n_scored
    return out


def _candidate_matrix(
    jobs: list[ScoreJob], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Ragged candidate ids as a padded [N, C] index matrix (padding indexes token 0) and its mask."""
    if all(j.candidate_ids is None for j in jobs):
        return None, None
    per_row = [row for j in jobs for row in (j.candidate_ids or [[] for _ in range(j.n_scored)])]
    width = max(1, max(len(r) for r in per_row))
    index = torch.zeros((len(per_row), width), dtype=torch.long)
    mask = torch.zeros((len(per_row), width), dtype=torch.bool)
    for n, row in enumerate(per_row):
        index[n, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[n, : len(row)] = True
    return index.to(device), mask
