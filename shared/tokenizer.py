"""The character tokenizer of the bundled task, in Hugging Face format (`PreTrainedTokenizerFast`).

One token per character of `shared.task.ALPHABET`, plus <pad>, <bos>, <eos> and <unk>. Saved next to
each bundled model, so `AutoTokenizer.from_pretrained("models/tiny-teacher")` works offline.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from shared.task import ALPHABET

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer: specials get ids 0-3, then the alphabet in order; `encode` prepends <bos>."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # [\s\S] matches every character, the newline too, which is a token of its own.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
