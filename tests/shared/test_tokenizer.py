"""The character tokenizer: exact round trip on everything the task emits; specials in place."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from shared.task import ALPHABET, random_problem
from shared.tokenizer import build_tokenizer


def test_round_trip_on_every_character_and_on_problems(tmp_path):
    built = build_tokenizer()
    built.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    rng = random.Random(0)
    texts = [ALPHABET] + [(lambda p: p.prompt + p.target)(random_problem(rng)) for _ in range(200)]
    for tok in (built, loaded):
        for text in texts:
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id
            assert len(ids) == len(text) + 1  # one token per character
            assert tok.unk_token_id not in ids
            assert tok.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_and_padding_side():
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"
    assert len(tok) == 4 + len(ALPHABET)
