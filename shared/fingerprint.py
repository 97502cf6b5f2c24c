"""A tokenizer's fingerprint: teacher and student must share a tokenizer, or token ids mean other text.

The hash covers the vocabulary (token -> id), the special tokens with their ids, and the chat template.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """'sha256:<hex>' of a Hugging Face tokenizer's vocabulary, special tokens and chat template."""
    specials = sorted(
        (str(token), tokenizer.convert_tokens_to_ids(token))
        for token in tokenizer.all_special_tokens
    )
    payload = {
        # By id, then token: get_vocab's order differs from process to process, so two tokens
        # of one id would otherwise hash in either order.
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
        "special_tokens": specials,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest}"
