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


class _Vocab:
    """A tokenizer as the fingerprint sees it, whose vocabulary comes back in a given order."""

    all_special_tokens: list[str] = []
    chat_template = None

    def __init__(self, items):
        self.items = items

    def get_vocab(self):
        return dict(self.items)


def test_the_vocabularys_order_does_not_matter_even_with_two_tokens_on_one_id():
    items = [("a", 0), ("b", 1), ("B", 1), ("c", 2)]  # an added token may share an id
    assert tokenizer_fingerprint(_Vocab(items)) == tokenizer_fingerprint(_Vocab(items[::-1]))


def test_the_bundled_tokenizers_fingerprint_is_the_one_published():
    # Clients compare it across versions of this package: a change to the hash breaks them.
    assert tokenizer_fingerprint(build_tokenizer()) == (
        "sha256:9a41446b206717937dadb097c71919f29ab793479602e2c2072e6314c87611b2"
    )
