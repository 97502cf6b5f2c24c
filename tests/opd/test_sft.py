"""The SFT recipe behind `opd make-models`: batches, schedule, the update, and a saved model."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from opd.models import count_parameters, load_model
from opd.sft import (
    SFTConfig,
    cpu_has_native_bf16,
    length_bucketed,
    lr_at,
    sft_batch,
    sft_step,
    train,
    training_batches,
)
from opd.tutor import tutor_solution
from shared.task import problems, solution_text


def test_sft_batch_labels_only_the_solution_and_eos(student):
    _, tokenizer = student
    batch = problems("train", 5, seed=3)
    ids, labels = sft_batch(tokenizer, batch)
    for b, problem in enumerate(batch):
        prompt = tokenizer(problem.prompt)["input_ids"]
        labelled = labels[b][labels[b] != -100].tolist()
        assert ids[b, : len(prompt)].tolist() == prompt
        assert (labels[b, : len(prompt)] == -100).all()
        assert labelled[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:-1]) == problem.target
        end = len(prompt) + len(labelled)
        assert ids[b, len(prompt) : end].tolist() == labelled
        assert (ids[b, end:] == tokenizer.pad_token_id).all()


def test_lr_warms_up_then_decays_to_a_tenth():
    cfg = SFTConfig(kind="student", steps=1000, lr=1e-3, warmup=100)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(550, cfg) == pytest.approx(0.55e-3)
    assert lr_at(1000, cfg) == pytest.approx(1e-4)
    assert lr_at(5000, cfg) == pytest.approx(1e-4)


def test_length_bucketing_keeps_every_problem_once():
    data = problems("train", 300, seed=1)
    batches = length_bucketed(data, batch_size=16, seed=0)
    assert Counter(p for batch in batches for p in batch) == Counter(data)
    assert all(len(batch) <= 16 for batch in batches)
    # Within a sorted window, a batch's lengths span less than the whole data's.
    spread = max(len(p.target) for p in data) - min(len(p.target) for p in data)
    widest = max(max(len(p.target) for p in b) - min(len(p.target) for p in b) for b in batches)
    assert widest < spread


def test_sft_step_lowers_the_loss_on_its_batch(student):
    model = copy.deepcopy(student[0])
    ids, labels = sft_batch(student[1], problems("train", 8, seed=5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = [sft_step(model, optimizer, ids, labels) for _ in range(6)]
    # Fitting one batch: every step lowers its loss, to well under half in six steps.
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


def test_sft_step_runs_in_fp32_unless_asked_for_bf16(student):
    ids, labels = sft_batch(student[1], problems("train", 4, seed=6))
    with torch.no_grad():
        fp32_loss = student[0](input_ids=ids, labels=labels).loss.item()
    losses = {}
    for bf16 in (False, True):
        model = copy.deepcopy(student[0])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the loss before any change
        losses[bf16] = sft_step(model, optimizer, ids, labels, bf16=bf16)
    # fp32 gives the reference forward's loss exactly; bf16 autocast rounds it (to ~3 digits).
    assert losses[False] == fp32_loss
    assert losses[True] != fp32_loss
    assert losses[True] == pytest.approx(fp32_loss, rel=0.05)


def test_train_saves_a_model_that_loads(student, tmp_path):
    _, tokenizer = student
    cfg = SFTConfig(kind="student", steps=2, batch_size=4, warmup=1, eval_every=2, eval_n=2)
    report = train(cfg, tokenizer, tmp_path)
    model, loaded_tokenizer = load_model(tmp_path)
    assert report["steps"] == 2
    assert report["precision"] == ("bf16 autocast" if cpu_has_native_bf16() else "fp32")
    assert report["parameters"] == count_parameters(model) == count_parameters(student[0])
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_a_student_of_the_tutor_learns_the_tutors_solutions():
    cfg = SFTConfig(kind="student", steps=4, batch_size=16, slip_max=12)
    taught = [p for batch in training_batches(cfg) for p in batch]
    correct = [
        p
        for batch in training_batches(SFTConfig(kind="student", steps=4, batch_size=16))
        for p in batch
    ]
    assert sorted(p.operands for p in taught) == sorted(p.operands for p in correct)
    assert all(p.target == tutor_solution(p.operands, 12)[0] for p in taught)
    assert all(p.target == solution_text(p.operands) for p in correct)
    assert any(p.target != solution_text(p.operands) for p in taught)


def test_a_student_of_the_tutor_is_also_scored_against_its_answers(student, tmp_path):
    small = dict(kind="student", steps=1, batch_size=4, warmup=1, eval_every=1, eval_n=2)
    assert "dev_tutor_accuracy" in train(SFTConfig(**small, slip_max=12), student[1], tmp_path)
    assert "dev_tutor_accuracy" not in train(SFTConfig(**small), student[1], tmp_path)
