"""The tokenizer fingerprint changes with anything that changes what an id means, and nothing else."""

from __future__ import annotations

from shared.fingerprint import tokenizer_fingerprint
from shared.tokenizer import build_tokenizer


def test_the_same_tokenizer_built_twice_has_one_fingerprint():
    assert tokenizer_fingerprint(build_tokenizer()) == tokenizer_fingerprint(build_tokenizer())


def test_a_new_token_or_chat_template_changes_it():
    base = tokenizer_fingerprint(build_tokenizer())
    grown = build_tokenizer()
    grown.add_tokens(["@"])
    templated = build_tokenizer()
    templated.chat_template = "{{ messages }}"
    assert len({base, tokenizer_fingerprint(grown), tokenizer_fingerprint(templated)}) == 3
