"""The teacher's numbers equal a direct float32 transformers forward, over real HTTP on loopback."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from shared.client import AsyncTeacherClient, TeacherClient
from shared.task import problems

TOL = 1e-5


def mixed_sequences(tokenizer, n: int = 7, seed: int = 3) -> list[tuple[list[int], list[int]]]:
    """Real task prompts with completions cut at different lengths (1 token to the whole target)."""
    out = []
    for i, p in enumerate(problems("eval", n, seed)):
        prompt = tokenizer(p.prompt)["input_ids"]
        target = tokenizer(p.target, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        cut = max(1, len(target) * (i + 1) // n)
        out.append((prompt, target[:cut]))
    return out


def reference_logp(model, prompt: list[int], completion: list[int], temperature: float = 1.0):
    """[n, V] float32 log-probs of the positions that predict each completion token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp[len(prompt) - 1 : len(prompt) + len(completion) - 1]


def assert_matches_reference(model, seqs, result, top_k=0, temperature=1.0, candidates=None):
    for s, ((prompt, completion), score) in enumerate(zip(seqs, result.results)):
        ref = reference_logp(model, prompt, completion, temperature)
        want = ref.gather(1, torch.tensor(completion)[:, None]).squeeze(1).numpy()
        assert score.logprobs.shape == (len(completion),)
        np.testing.assert_allclose(score.logprobs, want, atol=TOL, rtol=0)
        if top_k:
            values, ids = ref.topk(top_k, dim=-1)
            np.testing.assert_allclose(score.topk_logprobs, values.numpy(), atol=TOL, rtol=0)
            # Ids can only differ where two log-probs tie within the tolerance.
            same = score.topk_ids == ids.numpy()
            assert same.mean() > 0.99
            assert np.all(np.diff(score.topk_logprobs, axis=1) <= 0), "top-k must be sorted"
        if candidates is not None:
            for i, row in enumerate(candidates[s]):
                np.testing.assert_allclose(
                    score.candidate_logprobs[i], ref[i, row].numpy(), atol=TOL, rtol=0
                )


def test_mixed_length_batch_matches_reference_forward(teacher, teacher_url):
    model, tokenizer = teacher
    seqs = mixed_sequences(tokenizer)
    rng = np.random.default_rng(0)
    # Ragged candidates: 1-4 ids per position, like a student's own top-k of varying size.
    candidates = [
        [rng.integers(0, len(tokenizer), rng.integers(1, 5)).tolist() for _ in completion]
        for _, completion in seqs
    ]
    with TeacherClient(teacher_url) as client:
        result = client.score(seqs, top_k=5, candidate_ids=candidates)
    assert_matches_reference(model, seqs, result, top_k=5, candidates=candidates)
    assert result.usage.scored_tokens == sum(len(c) for _, c in seqs)
    assert result.usage.prompt_tokens == sum(len(p) for p, _ in seqs)


def samples_of_few_prompts(tokenizer) -> list[tuple[list[int], list[int]]]:
    """What a trainer sends: 4 samples of each of 2 prompts (completions of 1 token to the whole
    target, some alike), then one prompt of its own."""
    seqs = []
    for (prompt, completion), n in zip(mixed_sequences(tokenizer, n=7, seed=8)[-3:], (4, 4, 1)):
        cuts = [1, len(completion), len(completion) // 2 + 1, len(completion)][:n]
        seqs += [(prompt, completion[:cut]) for cut in cuts]
    return seqs


def test_samples_that_share_a_prompt_match_the_reference_forward(teacher, teacher_url):
    model, tokenizer = teacher
    seqs = samples_of_few_prompts(tokenizer)
    candidates = [[[1, 2, 3]] * len(c) for _, c in seqs]
    with TeacherClient(teacher_url) as client:
        result = client.score(seqs, top_k=5, candidate_ids=candidates)
    assert_matches_reference(model, seqs, result, top_k=5, candidates=candidates)


def test_concurrent_clients_get_their_own_exact_answers(teacher, teacher_url):
    model, tokenizer = teacher
    seqs = mixed_sequences(tokenizer, n=12, seed=5)

    async def run():
        async with AsyncTeacherClient(teacher_url) as client:
            return await asyncio.gather(*(client.score([s], top_k=3) for s in seqs))

    results = asyncio.run(run())
    for seq, result in zip(seqs, results):
        assert_matches_reference(model, [seq], result, top_k=3)


def test_json_and_binary_give_identical_numbers(teacher, teacher_url):
    _, tokenizer = teacher
    seqs = mixed_sequences(tokenizer, n=4)
    with (
        TeacherClient(teacher_url, binary=True) as b,
        TeacherClient(teacher_url, binary=False) as j,
    ):
        rb = b.score(seqs, top_k=4, candidate_ids=[[[1, 2]] * len(c) for _, c in seqs])
        rj = j.score(seqs, top_k=4, candidate_ids=[[[1, 2]] * len(c) for _, c in seqs])
    for sb, sj in zip(rb.results, rj.results):
        assert np.array_equal(sb.logprobs, sj.logprobs)
        assert np.array_equal(sb.topk_ids, sj.topk_ids)
        assert np.array_equal(sb.topk_logprobs, sj.topk_logprobs)
        for cb, cj in zip(sb.candidate_logprobs, sj.candidate_logprobs):
            assert np.array_equal(cb, cj)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(teacher, teacher_url, temperature):
    model, tokenizer = teacher
    seqs = mixed_sequences(tokenizer, n=3)
    with TeacherClient(teacher_url) as client:
        result = client.score(seqs, top_k=2, temperature=temperature)
    assert_matches_reference(model, seqs, result, top_k=2, temperature=temperature)


def test_max_positions_scores_only_the_first_tokens(teacher, teacher_url):
    model, tokenizer = teacher
    seqs = mixed_sequences(tokenizer, n=4)
    with TeacherClient(teacher_url) as client:
        result = client.score(seqs, max_positions=5)
    cut = [(p, c[:5]) for p, c in seqs]
    assert [len(r.logprobs) for r in result.results] == [len(c) for _, c in cut]
    assert_matches_reference(model, cut, result)
    assert result.usage.scored_tokens == sum(len(c) for _, c in cut)
