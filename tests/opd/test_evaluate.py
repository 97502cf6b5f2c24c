"""Evaluation: greedy accuracy, and avg@k sampled at a temperature, even for k = 1."""

from __future__ import annotations

import threading

import pytest

from opd.bundled import STUDENT_PATH
from opd.evaluate import EvaluationStopped, completion_text, evaluate
from opd.models import load_tokenizer
from shared.task import extract_answer, problems

PROBLEMS = problems("eval", 32, seed=0)


def test_one_sample_at_temperature_one_is_sampled_not_the_greedy_completion(student):
    greedy = evaluate(*student, PROBLEMS, progress=False)
    sampled = evaluate(*student, PROBLEMS, samples=1, temperature=1.0, progress=False)
    twice = evaluate(*student, PROBLEMS, samples=2, temperature=1.0, progress=False)
    assert sampled.mean_tokens != greedy.mean_tokens  # another completion for some problem
    assert sampled.samples == 1 and twice.samples == 2
    again = evaluate(*student, PROBLEMS, samples=1, temperature=1.0, progress=False)
    same = ("accuracy", "mean_tokens", "well_formed")
    assert [getattr(again, f) for f in same] == [getattr(sampled, f) for f in same]  # by the seed


def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_scores_the_same(student):
    model, tokenizer = student
    padless = load_tokenizer(STUDENT_PATH)  # its own copy: the session's stays as it is
    padless.pad_token = None  # as many Llama and Mistral tokenizers are saved
    assert padless.pad_token_id is None
    plain = evaluate(model, tokenizer, PROBLEMS[:8], progress=False)
    padded_with_eos = evaluate(model, padless, PROBLEMS[:8], progress=False)
    same = ("accuracy", "mean_tokens", "well_formed")
    assert [getattr(padded_with_eos, f) for f in same] == [getattr(plain, f) for f in same]


def test_a_special_token_inside_the_answer_spoils_it_and_text_after_eos_is_not_read(student):
    tokenizer = student[1]
    ids = tokenizer("A:45\n", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert extract_answer(completion_text(tokenizer, [*ids, eos])) == 45
    with_unk = [*ids[:3], tokenizer.unk_token_id, *ids[3:], eos]  # "A:4<unk>5"
    assert extract_answer(completion_text(tokenizer, with_unk)) is None
    after_eos = [*ids, eos, *tokenizer("A:7\n", add_special_tokens=False)["input_ids"]]
    assert extract_answer(completion_text(tokenizer, after_eos)) == 45


def test_an_id_no_token_has_spoils_the_answer_instead_of_vanishing(student):
    """A padded vocabulary's rows decode to nothing: "A:4<id 30>527" read as a right "A:4527"."""
    tokenizer = student[1]
    ids = tokenizer("A:4527", add_special_tokens=False)["input_ids"]
    past = len(tokenizer) + 7
    spoiled = [*ids[:3], past, *ids[3:], tokenizer.eos_token_id]
    assert completion_text(tokenizer, spoiled) == "A:4\ufffd527"
    assert extract_answer(completion_text(tokenizer, spoiled)) is None
    assert extract_answer(completion_text(tokenizer, [*ids, tokenizer.eos_token_id])) == 4527


def test_text_after_any_stop_id_the_model_lists_is_not_read(student):
    tokenizer = student[1]
    comma = tokenizer.convert_tokens_to_ids(",")
    ids = [*tokenizer("A:45\n", add_special_tokens=False)["input_ids"], comma]
    ids += tokenizer("\nA:7\n", add_special_tokens=False)["input_ids"]
    assert extract_answer(completion_text(tokenizer, ids)) == 7  # "," is no stop by default
    assert extract_answer(completion_text(tokenizer, ids, [tokenizer.eos_token_id, comma])) == 45


def test_a_stop_ends_an_evaluation_at_the_next_batch(student):
    model, tokenizer = student

    class SetAfterOneBatch(threading.Event):
        asked = 0

        def is_set(self) -> bool:
            self.asked += 1
            return self.asked > 1

    stop = SetAfterOneBatch()
    with pytest.raises(EvaluationStopped):
        evaluate(model, tokenizer, problems("eval", 6), batch_size=2, progress=False, stop=stop)
    assert stop.asked == 2  # one batch decoded, then the stop was seen
    unset = threading.Event()
    done = evaluate(model, tokenizer, problems("eval", 6), batch_size=2, progress=False, stop=unset)
    assert done.n == 6
