"""The decoding loop: greedy decoding is transformers' own, and the prompt's pass computes logits
for its last position only."""

from __future__ import annotations

import pytest
import torch

from opd.evaluate import encode_prompts
from opd.generate import generate
from shared.task import problems

PROMPTS = problems("eval", 4, seed=2)


@pytest.mark.parametrize("extra_stop", [None, ","], ids=["eos", "eos-and-comma"])
def test_greedy_decoding_is_transformers_generate_and_ends_at_each_stop_id(student, extra_stop):
    model, tokenizer = student
    prompts = encode_prompts(tokenizer, PROMPTS)
    stops = [tokenizer.eos_token_id]
    stops += [tokenizer.convert_tokens_to_ids(extra_stop)] if extra_stop else []
    ours = generate(model, prompts, 40, stops, tokenizer.pad_token_id)
    for prompt, completion in zip(prompts, ours.completions()):
        want = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
        assert completion == want
        if extra_stop:  # each solution writes a "," within 40 tokens
            assert completion[-1] == stops[1]


def test_the_prompts_pass_computes_only_the_last_positions_logits(student):
    model, tokenizer = student
    prompts = encode_prompts(tokenizer, PROMPTS)
    rows_seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows_seen.append(out.shape))
    try:
        generate(model, prompts, 3, tokenizer.eos_token_id, tokenizer.pad_token_id)
    finally:
        hook.remove()
    vocab = model.config.vocab_size
    assert rows_seen == [torch.Size([len(prompts), 1, vocab])] * 3


def test_an_empty_batch_decodes_to_nothing_and_an_empty_prompt_is_refused(student):
    model, tokenizer = student
    assert (
        generate(model, [], 5, tokenizer.eos_token_id, tokenizer.pad_token_id).completions() == []
    )
    for prompts in ([[]], [[], encode_prompts(tokenizer, PROMPTS[:1])[0]]):
        # Alone, a crash deep in the model; beside others, tokens drawn from a uniform guess.
        with pytest.raises(ValueError, match="an empty prompt"):
            generate(model, prompts, 5, tokenizer.eos_token_id, tokenizer.pad_token_id)
