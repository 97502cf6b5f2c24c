"""Checkpoints: everything a run needs to continue exactly where it stopped.

    DIR/checkpoints/step_000040/   student (safetensors + tokenizer), optimizer.pt, state.json, rng.pt
    DIR/checkpoints/latest         name of the newest complete checkpoint

A checkpoint is written to a temporary folder and renamed into place, and `latest` is replaced
atomically, so a run killed at any moment leaves either the old or the new checkpoint, never half.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError

from opd.models import hf_bars_for, weight_bytes


@dataclass
class TrainState:
    step: int  # steps completed
    data_position: int  # problems consumed from the training stream
    schedule: str
    elapsed_s: float  # training wall-clock so far (excluding evaluation)
    teacher_tokens: int
    tokens_generated: int
    max_new_tokens: int | None = None  # H_max of the schedule (None in checkpoints made before)


class UnreadableCheckpoint(Exception):
    """A checkpoint file that cannot be read, or not without running code from it."""


# numpy's RNG state is a uint32 array: rebuilding one is all that rng.pt may ask of the unpickler.
# Allowed once for the process (torch's allowlist is global, so a `with` block in one thread would
# take it away from a run resuming in another), under numpy 2's and numpy 1's module names.
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]
torch.serialization.add_safe_globals(
    [
        _RECONSTRUCT,
        (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]
)


def _torch_file(path: Path):
    """A file torch.save wrote, never fully unpickled: a full unpickle would run any code that a
    checkpoint made by someone else carries."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # refused by the safe unpickler, truncated, missing, ...
        raise UnreadableCheckpoint(f"{path} cannot be read safely ({_why(exc)})") from None


def _why(exc: Exception) -> str:
    """The line of torch's long message that says what was refused, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = next((line for line in lines if "Unsupported global" in line), None)
    return said or (lines[0] if lines else type(exc).__name__)


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def save(out, model, tokenizer, optimizer, state: TrainState, keep: int = 2) -> Path:
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(state.step)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with hf_bars_for(weight_bytes(model)):
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_states(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(root / "latest", name)
    for old in sorted(root.glob("step_*"), key=_step_number)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_number(path: Path) -> int:
    """A checkpoint's step, for ordering: by name, step_1000000 would sort before step_999999
    (six digits of padding) and each checkpoint from then on would prune itself."""
    digits = path.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else -1


def latest(out) -> Path | None:
    pointer = checkpoint_dir(out) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(out) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load(path: Path, model, optimizer) -> TrainState:
    """Restore weights, optimizer and RNG states from `path` into the given objects."""
    load_weights(path, model)
    optimizer.load_state_dict(_torch_file(path / "optimizer.pt"))
    set_rng_states(_torch_file(path / "rng.pt"))
    return read_state(path)


def rng_states() -> dict:
    """The process's random generators, as rng.pt keeps them."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        # Dropout on a GPU draws from CUDA's generators (the rollouts have their own).
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_states(states: dict) -> None:
    """Put the generators back as `rng_states` (or an older rng.pt, without CUDA's) found them."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    _set_cuda_rng(states.get("cuda", []))


def _set_cuda_rng(states: list[torch.Tensor]) -> None:
    """CUDA's generator states as saved, where this machine has those GPUs (a run resumed on the
    CPU, or on fewer GPUs, has no use for them)."""
    if states and torch.cuda.is_available() and torch.cuda.device_count() >= len(states):
        for device, state in enumerate(states):
            torch.cuda.set_rng_state(state, device)


def read_state(path: Path) -> TrainState:
    """The step, data position and schedule of the checkpoint at `path` (no weights read);
    ValueError naming a field that is missing or of another type (a hand-edited state.json)."""
    try:
        return _STATE.validate_json((path / "state.json").read_bytes(), strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "state"
        raise ValueError(f"{field}: {error['msg']}") from None


_STATE = TypeAdapter(TrainState)


def check_readable(path: Path) -> None:
    """The checkpoint at `path` has its files, and its weights' headers read (cheap: no weight is
    loaded), so a run refuses a damaged one before it starts rather than when it resumes."""
    from safetensors import safe_open

    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise UnreadableCheckpoint(f"{path} has no student weights (*.safetensors)")
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as weights:
                weights.keys()
        except Exception as exc:
            raise UnreadableCheckpoint(f"{shard} cannot be read ({_why(exc)})") from None
    for name in (*_indexed_shards(path), "optimizer.pt", "rng.pt"):
        if not (path / name).is_file():
            raise UnreadableCheckpoint(f"{path / name} is missing")


def _indexed_shards(path: Path) -> list[str]:
    """The weight files a sharded checkpoint's index names (none for one file): a shard lost to a
    pruned copy is then named as missing, not found later as weights that do not fit."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnreadableCheckpoint(f"{index} cannot be read ({_why(exc)})") from None


def load_weights(path: Path, model) -> None:
    """Load the student's safetensors (one file or shards) into `model`, strictly: every weight
    must come from the file, except one that `save_pretrained` left out because it shares storage
    with a saved one (tied input and output embeddings), which loading its twin restores."""
    from safetensors.torch import load_file

    params = model.state_dict()
    loaded, unexpected = set(), []
    for shard in sorted(path.glob("*.safetensors")):  # one at a time: a large student's shards
        try:  # need not all be in memory at once
            weights = load_file(shard)
        except Exception as exc:  # truncated, not safetensors, ...
            raise UnreadableCheckpoint(f"{shard} cannot be read ({_why(exc)})") from None
        try:
            unexpected += model.load_state_dict(weights, strict=False).unexpected_keys
        except RuntimeError as exc:  # a weight of another shape: another model
            raise ValueError(
                f"{path}: the checkpoint does not fit the student: {_first(exc)}"
            ) from None
        loaded |= {params[name].data_ptr() for name in weights if name in params}
    missing = [name for name, value in params.items() if value.data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(
            f"{path}: the checkpoint does not fit the student (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


def _first(exc: RuntimeError) -> str:
    """torch's first size mismatch and how many more there are, not one line per weight."""
    lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
    if not lines:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    return lines[0].rstrip(".") + more


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
