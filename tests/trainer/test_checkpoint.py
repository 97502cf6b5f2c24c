"""Checkpoints: a round trip restores weights, optimizer, RNG states and position; old ones are
pruned; a run killed mid-write leaves the previous checkpoint as the latest, whole."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.bundled import STUDENT_PATH
from opd.models import load_model
from services.trainer import checkpoint
from services.trainer.checkpoint import TrainState


def trained_student():
    model, tokenizer = load_model(STUDENT_PATH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(
        input_ids=torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[1, 5, 6, 7]])
    ).loss.backward()
    optimizer.step()
    return model, tokenizer, optimizer


def state_at(step: int) -> TrainState:
    return TrainState(step, step * 16, "full", 1.5 * step, 100 * step, 100 * step)


def test_a_round_trip_restores_everything_a_run_continues_from(tmp_path):
    model, tokenizer, optimizer = trained_student()
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    path = checkpoint.save(tmp_path, model, tokenizer, optimizer, state_at(7))
    expected = (torch.rand(3), random.random(), np.random.rand())

    fresh, _ = load_model(STUDENT_PATH)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = checkpoint.load(checkpoint.latest(tmp_path), fresh, fresh_optimizer)

    assert path == checkpoint.latest(tmp_path) and state == state_at(7)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    saved, restored = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert len(restored) == len(list(model.parameters()))
    for a, b in zip(saved.values(), restored.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(
            a["exp_avg_sq"], b["exp_avg_sq"]
        )
    again = (torch.rand(3), random.random(), np.random.rand())  # the RNGs as they were at save
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_round_trip_restores_cudas_generators_for_dropout_on_a_gpu(tmp_path):
    model, tokenizer, optimizer = trained_student()
    torch.cuda.init()  # as a run with its student on the GPU has (manual_seed_all is lazy)
    torch.cuda.manual_seed_all(3)
    checkpoint.save(tmp_path, model, tokenizer, optimizer, state_at(1))
    expected = torch.rand(3, device="cuda")
    checkpoint.load(checkpoint.latest(tmp_path), model, optimizer)
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_a_checkpoint_without_cuda_states_loads_as_before(tmp_path):
    """Checkpoints made before CUDA's states were saved, or on a machine without CUDA."""
    model, tokenizer, optimizer = trained_student()
    path = checkpoint.save(tmp_path, model, tokenizer, optimizer, state_at(2))
    rng = torch.load(path / "rng.pt", weights_only=True)
    del rng["cuda"]
    torch.save(rng, path / "rng.pt")
    assert checkpoint.load(path, model, optimizer) == state_at(2)


class Payload:
    """What a malicious checkpoint carries: unpickling it creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    model, tokenizer, optimizer = trained_student()
    path = checkpoint.save(tmp_path, model, tokenizer, optimizer, state_at(1))
    marker = tmp_path / "ran"
    torch.save({"torch": torch.get_rng_state(), "extra": Payload(marker)}, path / "rng.pt")
    with pytest.raises(
        checkpoint.UnreadableCheckpoint, match="rng.pt cannot be read safely .*Unsupported global"
    ):
        checkpoint.load(path, model, optimizer)
    assert not marker.exists()
    (path / "optimizer.pt").write_bytes(b"truncated")
    with pytest.raises(checkpoint.UnreadableCheckpoint, match="optimizer.pt cannot be read"):
        checkpoint.load(path, model, optimizer)


def test_a_sharded_checkpoint_missing_a_shard_is_refused_naming_it(tmp_path):
    model, tokenizer, _ = trained_student()
    model.save_pretrained(tmp_path, max_shard_size="500KB")  # a large student's layout
    for name in ("optimizer.pt", "rng.pt"):
        (tmp_path / name).write_bytes(b"")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    checkpoint.check_readable(tmp_path)  # whole, it passes
    shards[-1].unlink()
    with pytest.raises(checkpoint.UnreadableCheckpoint, match=f"{shards[-1].name} is missing"):
        checkpoint.check_readable(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(checkpoint.UnreadableCheckpoint, match="index.json cannot be read"):
        checkpoint.check_readable(tmp_path)


def test_damaged_weights_are_refused_naming_the_file(tmp_path):
    model, tokenizer, optimizer = trained_student()
    path = checkpoint.save(tmp_path, model, tokenizer, optimizer, state_at(1))
    checkpoint.check_readable(path)  # an intact one passes
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk
    for read in (checkpoint.check_readable, lambda p: checkpoint.load(p, model, optimizer)):
        with pytest.raises(checkpoint.UnreadableCheckpoint, match="model.safetensors cannot be"):
            read(path)
    weights.unlink()
    with pytest.raises(checkpoint.UnreadableCheckpoint, match="no student weights"):
        checkpoint.check_readable(path)


# Past six digits too: by name, step_1000000 sorts before step_999999.
@pytest.mark.parametrize("steps", [(1, 2, 3), (999_999, 1_000_000, 1_000_001)])
def test_old_checkpoints_are_pruned(tmp_path, steps):
    model, tokenizer, optimizer = trained_student()
    for step in steps:
        checkpoint.save(tmp_path, model, tokenizer, optimizer, state_at(step), keep=2)
    root = checkpoint.checkpoint_dir(tmp_path)
    kept = [checkpoint.step_name(step) for step in steps[1:]]
    assert sorted(p.name for p in root.glob("step_*")) == kept
    assert checkpoint.latest(tmp_path).name == kept[-1]
    assert checkpoint.latest(tmp_path / "elsewhere") is None


class DiesWhileSaving:
    """A tokenizer whose save fails, as a run killed in the middle of writing a checkpoint."""

    def save_pretrained(self, folder):
        raise KeyboardInterrupt


def test_a_run_killed_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    model, tokenizer, optimizer = trained_student()
    checkpoint.save(tmp_path, model, tokenizer, optimizer, state_at(3))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, model, DiesWhileSaving(), optimizer, state_at(4))
    found = checkpoint.latest(tmp_path)
    assert found.name == "step_000003"
    assert checkpoint.load(found, model, optimizer) == state_at(3)
    assert not (checkpoint.checkpoint_dir(tmp_path) / "step_000004").exists()


def tied_student(seed: int) -> LlamaForCausalLM:
    """A student whose output layer shares the input embedding, as in most small real models."""
    config = LlamaConfig(
        vocab_size=23,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def test_a_student_with_tied_embeddings_round_trips(tmp_path):
    _, tokenizer = load_model(STUDENT_PATH)
    model = tied_student(0)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path, model, tokenizer, optimizer, state_at(1))

    fresh = tied_student(1)
    checkpoint.load(checkpoint.latest(tmp_path), fresh, torch.optim.AdamW(fresh.parameters()))
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, fresh.state_dict()[name]), name
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    model, tokenizer, optimizer = trained_student()
    checkpoint.save(tmp_path, model, tokenizer, optimizer, state_at(1))
    other = tied_student(0)
    with pytest.raises(ValueError, match="does not fit the student") as error:
        checkpoint.load(checkpoint.latest(tmp_path), other, torch.optim.AdamW(other.parameters()))
    assert "\n" not in str(error.value)  # one line, not one per weight
