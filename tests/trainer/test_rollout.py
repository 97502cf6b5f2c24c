"""Rollouts stop at the horizon, reach the teacher exactly once in micro-batches, repeat for a seed,
and carry the sampling policy's true log-probs."""

from __future__ import annotations

import json
import shutil

import torch

from opd.bundled import STUDENT_PATH
from opd.models import load_model
from services.trainer.rollout import sample_rollouts
from services.trainer.step import student_logprobs
from shared.task import problems

PROBLEMS = problems("train", 6, seed=1)


def sample(student, horizon: int, seed: int = 0, micro_batch: int = 4):
    model, tokenizer = student
    batches = []
    rollouts = sample_rollouts(
        model,
        tokenizer,
        PROBLEMS,
        2,
        horizon,
        torch.Generator().manual_seed(seed),
        batches.append,
        micro_batch,
    )
    return rollouts, batches


def test_rollouts_stop_at_the_horizon(student):
    rollouts, _ = sample(student, horizon=9)
    assert len(rollouts) == 12
    assert all(1 <= len(r.completion_ids) <= 9 for r in rollouts)
    eos = student[1].eos_token_id
    for r in rollouts:
        assert r.finished == (r.completion_ids[-1] == eos)
        assert r.finished or len(r.completion_ids) == 9


def test_every_rollout_is_handed_on_once_in_micro_batches(student):
    rollouts, batches = sample(student, horizon=40, micro_batch=5)
    keys = [r.key for batch in batches for r in batch]
    assert sorted(keys) == list(range(12))
    assert all(len(b) == 5 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 5


def test_same_seed_same_rollouts(student):
    # The bundled student is sure of its early tokens: seeds 4 and 5 part only late in a solution.
    a, _ = sample(student, horizon=120, seed=4)
    b, _ = sample(student, horizon=120, seed=4)
    c, _ = sample(student, horizon=120, seed=5)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]


def test_sample_logprobs_equal_a_forward_pass(student):
    rollouts, _ = sample(student, horizon=30)
    with torch.no_grad():
        logp_B_T_V, mask_B_T = student_logprobs(student[0], rollouts)
    for b, r in enumerate(rollouts):
        want = (
            logp_B_T_V[b, : len(r.completion_ids)]
            .gather(1, torch.tensor(r.completion_ids)[:, None])
            .squeeze(1)
        )
        assert torch.allclose(torch.tensor(r.sample_logprobs), want, atol=1e-4)
        assert mask_B_T[b].sum() == len(r.completion_ids)


def test_rollouts_end_at_the_stop_ids_the_students_generation_config_lists(student, tmp_path):
    """As an instruct model's end of turn, listed only in generation_config.json: tokens after it
    would be scored and trained on."""
    folder = tmp_path / "student"
    shutil.copytree(STUDENT_PATH, folder)
    comma = student[1].convert_tokens_to_ids(",")
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], comma]
    (folder / "generation_config.json").write_text(json.dumps(config))
    rollouts, _ = sample(load_model(folder), horizon=40)
    assert all(r.finished and r.completion_ids[-1] == comma for r in rollouts)
    assert all(comma not in r.completion_ids[:-1] for r in rollouts)
