"""The hf backend's limits (the longest sequence it serves never exceeds the model's positions), its
two decoder passes (sequences that share a prompt run it once and get the same hidden states), and
its logits, which are the model's own also where a family changes them after the output layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from opd.bundled import TEACHER_PATH
from opd.models import load_tokenizer
from services.teacher.backends.base import ScoreJob
from services.teacher.backends.hf import (
    HFBackend,
    OutputLogits,
    check_output_logits,
    rope_that_follows_the_batch,
    shared_pass_fits,
    top_k_by_value_then_id,
    vocab_rank,
    worth_sharing,
)
from tests.teacher.test_scoring import mixed_sequences, reference_logp, samples_of_few_prompts


@pytest.mark.parametrize("asked, served", [(None, 512), (300, 300), (4096, 512)])
def test_max_seq_len_is_capped_by_the_models_positions(asked, served):
    # models/tiny-teacher has 512 positions; the default max_batch_tokens is larger.
    assert HFBackend(str(TEACHER_PATH), max_seq_len=asked).load().max_seq_len == served


@pytest.fixture(scope="module")
def backend():
    hf = HFBackend(str(TEACHER_PATH))
    hf.load()
    return hf


def test_ranks_of_scored_tokens_match_a_reference_forward(backend, teacher):
    model, _ = teacher
    seqs = samples_of_few_prompts(backend.tokenizer)[:3]
    jobs = [ScoreJob(p + c, len(p), want_ranks=True) for p, c in seqs]
    for (prompt, completion), score in zip(seqs, backend.score_batch(jobs)):
        ref = reference_logp(model, prompt, completion)
        target = ref.gather(1, torch.tensor(completion)[:, None])
        assert score.ranks.tolist() == (ref >= target).sum(-1).tolist()


def test_a_tied_token_takes_the_last_of_the_tied_ranks_as_in_vllm():
    logp = torch.log_softmax(torch.tensor([[2.0, 2.0, 1.0, 2.0], [0.0, 3.0, 3.0, 1.0]]), dim=-1)
    target = logp[:, [0]]  # tied with two others in row 0, the least likely in row 1
    assert vocab_rank(logp, target).tolist() == [3, 4]
    assert vocab_rank(logp, logp[:, [1]]).tolist() == [3, 2]


def test_top_k_orders_ties_by_id_and_settles_the_kth_place_the_same_way():
    logp = torch.tensor([[0.0, -1, -1, -1, -1, -2], [-3.0, -1, -1, -2, -1, -1]])
    values, ids = top_k_by_value_then_id(logp, 3)
    assert ids.tolist() == [[0, 1, 2], [1, 2, 4]]
    assert values.tolist() == [[0.0, -1, -1], [-1, -1, -1]]
    # bf16 log-probs tie often; each row's top-k is the first k of its top-(k + j), whatever k.
    rows = torch.log_softmax(torch.randn(64, 3000, generator=torch.Generator().manual_seed(0)), -1)
    rows = rows.to(torch.bfloat16).float()
    widest_values, widest = top_k_by_value_then_id(rows, 50)
    for k in (1, 2, 3, 20):
        assert torch.equal(top_k_by_value_then_id(rows, k)[1], widest[:, :k])
    order = [(-v, i) for v, i in zip(widest_values[0].tolist(), widest[0].tolist())]
    assert order == sorted(order)


def test_a_requests_top_k_is_the_same_whichever_top_k_shares_its_batch():
    """The bf16 teacher ties tokens at the k-th place; which tied ones a request got used to
    change with the top_k of the request batched beside it."""
    # Prompts run once for several sequences give other bf16 numbers than the padded pass; with
    # that pass off, a request's numbers are the same in either batch, and only ties could differ.
    bf16 = HFBackend(str(TEACHER_PATH), dtype="bfloat16", share_prompts=False)
    bf16.load()
    seqs = mixed_sequences(bf16.tokenizer, n=10, seed=1)  # 2 positions tie at the 3rd place
    narrow = [ScoreJob(p + c, len(p), top_k=3) for p, c in seqs]
    wide = [ScoreJob(p + c, len(p), top_k=20) for p, c in seqs]
    alone = bf16.score_batch(narrow)
    beside = bf16.score_batch(narrow + wide)[: len(narrow)]
    for score, shared in zip(alone, beside):
        assert np.array_equal(score.topk_ids, shared.topk_ids)


def test_prompts_shared_by_several_sequences_run_once_with_the_same_result(backend):
    jobs = [
        ScoreJob(prompt + completion, len(prompt))
        for prompt, completion in samples_of_few_prompts(backend.tokenizer)
    ]
    assert backend.cache_arg is not None  # a Llama decoder takes a KV cache
    assert worth_sharing(jobs)  # so the HTTP test with these sequences takes the shared pass too
    with torch.inference_mode():
        shared, plain = backend._rows_sharing_prompts(jobs), backend._rows(jobs)
    for job, a, b in zip(jobs, shared, plain):
        assert a.shape == b.shape == (job.n_scored, backend.output_logits.head.weight.shape[1])
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_share_prompts_off_leaves_every_batch_to_the_one_pass():
    plain = HFBackend(str(TEACHER_PATH), share_prompts=False)
    plain.load()
    assert plain.cache_arg is None  # score_batch then never takes the shared pass


@pytest.mark.parametrize(
    "failure",
    [
        torch.OutOfMemoryError("CUDA out of memory"),
        # What the CPU allocator raises (torch 2.13): no OutOfMemoryError.
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
    ],
    ids=["cuda", "cpu"],
)
def test_a_shared_pass_out_of_memory_scores_the_batch_the_lean_way_and_keeps_sharing(
    monkeypatch, failure
):
    hf = HFBackend(str(TEACHER_PATH))
    hf.load()
    jobs = [ScoreJob(p + c, len(p)) for p, c in samples_of_few_prompts(hf.tokenizer)]
    expected = hf.score_batch(jobs)

    def out_of_memory(jobs):  # as the copies of a long prompt's KV cache can
        raise failure

    monkeypatch.setattr(hf, "_rows_sharing_prompts", out_of_memory)
    for a, b in zip(hf.score_batch(jobs), expected):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert hf.cache_arg is not None  # a batch too big for it says nothing of the model


def test_sharing_is_for_prompts_that_are_much_of_the_batch(backend):
    samples = [ScoreJob([1] + [5] * 30 + [7] * 26, 31) for _ in range(4)]  # 3 x 31 of 228 saved
    assert worth_sharing(samples)
    # The TRL dialect scores whole sequences after their <bos>: sharing it saves nothing.
    whole = [ScoreJob(job.input_ids, 1) for job in samples]
    assert not worth_sharing(whole)
    assert not worth_sharing(samples[:1])


def test_a_shared_pass_that_would_outgrow_the_batch_budget_is_not_taken():
    # Packed by their longest sequence, 8 x 2,048 tokens fit 16,384; sharing would hold every row
    # at the longest prompt plus the longest completion, 1,900 + 1,948 slots.
    long_prompts = [ScoreJob([1] * 1900 + [5] * 148, 1900) for _ in range(4)]
    long_tails = [ScoreJob([2] * 100 + [5] * 1948, 100) for _ in range(4)]
    assert not shared_pass_fits(long_prompts + long_tails, 16_384)
    assert shared_pass_fits(long_prompts, 16_384) and shared_pass_fits(long_tails, 16_384)


def tiny_model(folder, config) -> str:
    """A random causal LM with `config`'s architecture and the bundled tokenizer, saved in `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer(TEACHER_PATH).save_pretrained(folder)
    return str(folder)


def both_passes(path: str, jobs: list[ScoreJob]) -> tuple[HFBackend, list, list]:
    shared, plain = HFBackend(path), HFBackend(path, share_prompts=False)
    shared.load()
    plain.load()
    return shared, shared.score_batch(jobs), plain.score_batch(jobs)


def test_learned_positions_never_see_a_padding_position_past_their_last(tmp_path):
    # GPT-2 style: 32 positions, and no sequence longer than 30. The short prompt's long tail pads
    # the long prompt's short tail out to position 28 + 9 = 37.
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=32, n_positions=32, n_embd=64, n_layer=2, n_head=2)
    path = tiny_model(tmp_path / "gpt2", config)
    long, short = [1] + [5] * 27, [1] + [6] * 4
    jobs = [ScoreJob(long + [7] * 2, 28)] * 2 + [ScoreJob(short + [7] * 10, 5)] * 2
    backend, shared, plain = both_passes(path, jobs)
    assert backend.cache_arg is not None  # the shared pass ran, and stays on
    for a, b in zip(shared, plain):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_a_sliding_window_model_turns_sharing_off_and_scores_as_one_pass(tmp_path):
    from transformers import MistralConfig

    config = MistralConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        sliding_window=8,
    )
    path = tiny_model(tmp_path / "mistral", config)
    short, long = [1] + [5] * 4, [1] + [6] * 15  # the short prompt padded past the window
    jobs = [ScoreJob(p + [7] * 6, len(p)) for p in (short, short, long, long)]
    backend, shared, plain = both_passes(path, jobs)
    assert backend.cache_arg is None
    for a, b in zip(shared, plain):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)


@pytest.mark.parametrize(
    "family, after_the_head",
    [
        ("Cohere", {"logit_scale": 0.0625}),
        ("Granite", {"logits_scaling": 8.0}),
        ("Gemma2", {"final_logit_softcapping": 0.05, "head_dim": 16}),
    ],
)
def test_a_family_that_changes_its_logits_after_the_head_is_scored_as_its_forward_does(
    tmp_path, family, after_the_head
):
    config = getattr(transformers, f"{family}Config")(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        **after_the_head,
    )
    backend = HFBackend(tiny_model(tmp_path / family, config))
    backend.load()
    ids = [1, 5, 9, 12, 7, 3]
    [score] = backend.score_batch([ScoreJob(input_ids=ids, n_prompt=2)])
    with torch.no_grad():
        logp = torch.log_softmax(backend.model(torch.tensor([ids])).logits[0].float(), -1)
    want = logp[1:-1].gather(1, torch.tensor(ids[2:])[:, None]).squeeze(1)
    np.testing.assert_allclose(score.logprobs, want.numpy(), atol=1e-5)


def test_a_change_to_the_logits_the_backend_does_not_reproduce_is_refused_at_load(backend):
    wrong = OutputLogits(backend.model)
    wrong.scale = 2.0  # as if the model's forward doubled its logits and the backend did not
    with pytest.raises(ValueError, match="serve it with --backend vllm"):
        check_output_logits(backend.model, backend.decoder, wrong)


@pytest.mark.parametrize(
    "rope, kind",
    [
        (None, None),
        ({"rope_type": "linear", "factor": 2.0}, None),
        ({"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
        (
            {
                "rope_type": "longrope",
                "short_factor": [1.0] * 16,
                "long_factor": [2.0] * 16,
                "original_max_position_embeddings": 256,
            },
            "longrope",
        ),
    ],
)
def test_a_rope_whose_frequencies_follow_the_batch_is_named(rope, kind):
    """transformers picks dynamic and longrope frequencies from the batch's longest position, so
    padding to a longer neighbour can change a sequence's log-probs: the load warns of it."""
    config = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=4, max_position_embeddings=512, rope_scaling=rope
    )
    assert rope_that_follows_the_batch(config) == kind
    nested = {
        "full_attention": config.rope_parameters,
        "sliding_attention": {"rope_type": "default"},
    }
    assert rope_that_follows_the_batch(type("Config", (), {"rope_parameters": nested})) == kind
