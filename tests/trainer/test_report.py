"""Run records: a resumed run keeps exactly the steps up to its checkpoint, so no step is recorded
twice or lost."""

from __future__ import annotations

import pytest

from services.trainer.report import JsonlLog, first_reaching, read_jsonl, run_labels


def test_a_resumed_log_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = JsonlLog(path)
    for step in range(1, 6):
        log.write({"step": step})
    resumed = JsonlLog(path, keep_through_step=3)  # the run died after step 5; resumed at 3
    resumed.write({"step": 4})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]


def test_a_fresh_run_starts_an_empty_log(tmp_path):
    path = tmp_path / "runs" / "eval.jsonl"
    JsonlLog(path).write({"step": 1})
    JsonlLog(path)
    assert read_jsonl(path) == [] and read_jsonl(tmp_path / "missing.jsonl") == []


def test_a_line_torn_by_a_kill_is_dropped_on_resume_and_named_elsewhere(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')  # killed while writing step 3
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        read_jsonl(path)
    JsonlLog(path, keep_through_step=2).write({"step": 3})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # not a kill's tear: refused
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        JsonlLog(path, keep_through_step=3)


def test_first_reaching_finds_the_first_evaluation_at_an_accuracy_despite_float_rounding():
    evals = [{"step": 0, "accuracy": 0.19}, {"step": 8, "accuracy": 24 / 200}]
    # 28 of 200 less 2 points is 0.12000000000000001 in floats, above 24 of 200 (0.12).
    assert 28 / 200 - 0.02 > 24 / 200
    assert first_reaching(evals[1:], 28 / 200 - 0.02)["step"] == 8
    assert first_reaching(evals, 0.19)["step"] == 0
    assert first_reaching(evals, 0.2) is None


def test_runs_that_share_a_folder_name_are_told_apart_in_the_legend(tmp_path):
    seeds = [tmp_path / "seed0" / "full", tmp_path / "seed1" / "full", tmp_path / "seed1" / "popd"]
    assert run_labels(seeds) == ["seed0/full", "seed1/full", "seed1/popd"]
    assert run_labels(seeds[1:]) == ["full", "popd"]  # names that differ stay short
