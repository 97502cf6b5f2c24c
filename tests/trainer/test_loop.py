"""Distillation runs against real teacher processes: faults, bad input, and exact resume."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.bundled import STUDENT_PATH, TEACHER_PATH
from services.teacher.app import create_app
from services.teacher.process import free_port, start_teacher, stop
from services.teacher.settings import TeacherSettings
from services.trainer import checkpoint, loop
from services.trainer.checkpoint import checkpoint_dir
from services.trainer.config import RunConfig
from services.trainer.loop import (
    RunError,
    check_out,
    check_teacher_limits,
    peak_memory,
    reset_peak_rss,
    run,
    training_problems,
)
from services.trainer.report import read_jsonl
from shared.errors import NotReady, TeacherError
from shared.task import problems
from tests.conftest import (
    TEACHER_REQUESTS,
    metric,
    serve,
    static_files,
    teacher_with_another_tokenizer,
    wait_for,
)
from tests.teacher.test_routes import GatedBackend, HangingBackend, SlowLoadBackend

# Small but real: 4 problems x 2 samples per step, horizon 24 tokens, tiny evaluations.
SMALL = dict(
    prompts_per_step=4,
    samples_per_prompt=2,
    schedule="truncated:24",
    eval_n=8,
    eval_every=0,
    micro_batch=8,
    threads=1,
    progress=False,
)


@pytest.fixture(scope="module")
def teacher_process():
    proc, url = start_teacher(str(TEACHER_PATH), threads=1)
    yield url
    stop(proc)


def trainer_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.trainer.cli", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def small_args(url: str, out: Path, steps: int = 4, *extra: str) -> list[str]:
    flags = []
    for key, value in SMALL.items():
        flag = "--" + key.replace("_", "-")
        flags += (
            [flag]
            if value is True
            else (["--no-progress"] if value is False else [flag, str(value)])
        )
    return ["--teacher-url", url, "--out", str(out), "--steps", str(steps), *flags, *extra]


def assert_every_step_once(out: Path, steps: int) -> list[dict]:
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:  # every rollout token was scored (a hedged one may have been twice)
        assert r["teacher_tokens"] >= r["tokens_generated"]
    return records


def test_unreachable_teacher_is_a_clear_error_naming_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = trainer_cli(*small_args(url, tmp_path / "run"), timeout=120)
    assert result.returncode == 1
    assert url in result.stderr and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_schedule_is_a_clear_error(tmp_path):
    result = trainer_cli("--schedule", "progressive:h0=8", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "--schedule" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_device_is_a_clear_error(tmp_path):
    result = trainer_cli("--device", "gpu", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "--device: 'gpu' is not a device name: use cpu, cuda or cuda:N" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_student_without_cuda_is_a_clear_error(tmp_path):
    result = trainer_cli("--device", "cuda", "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "--device cuda: CUDA is not available here" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_student_folder_that_cannot_load_is_named_by_its_flag(tmp_path):
    for folder, files in [
        ("bare", ["config.json"]),
        ("student", ["config.json", "model.safetensors"]),
    ]:
        (tmp_path / folder).mkdir()
        for name in files:
            shutil.copy(STUDENT_PATH / name, tmp_path / folder / name)
    cases = [
        ("missing", "no such file or directory"),
        ("bare", "no weights files"),
        ("student", "no tokenizer"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:  # together: each spends seconds importing torch
        results = pool.map(
            lambda case: trainer_cli(
                "--student", str(tmp_path / case[0]), "--out", str(tmp_path / "run")
            ),
            cases,
        )
    for (student, says), result in zip(cases, results):
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"error: --student {tmp_path / student}: {says}" in result.stderr
        assert not (tmp_path / "run").exists()


def test_a_server_that_is_not_a_teacher_is_named_without_its_page(tmp_path):
    with static_files(tmp_path) as url:
        result = trainer_cli(*small_args(url, tmp_path / "run"))
    assert result.returncode == 1
    assert f"{url} is not an OPD teacher" in result.stderr and "404" in result.stderr
    assert "<html" not in result.stderr.lower() and "Traceback" not in result.stderr


def test_settings_beyond_the_teachers_limits_are_refused_before_any_work(tmp_path):
    short = create_app(TeacherSettings(model=str(TEACHER_PATH), max_seq_len=150))
    with serve(short) as url:
        for extra, says in [
            (["--loss", "forward_kl_topk", "--top-k", "25"], "--top-k 25: the teacher at"),
            (["--schedule", "full"], "exceeds the max_seq_len 150"),
        ]:
            result = trainer_cli(*small_args(url, tmp_path / "run"), *extra)
            assert result.returncode == 1 and says in result.stderr, result.stderr
            assert not (tmp_path / "run").exists()


def test_a_resumed_run_draws_the_problems_after_those_it_used():
    cfg = RunConfig(prompts_per_step=4)
    used, rest = problems("train", 12, cfg.seed)[:8], problems("train", 12, cfg.seed)[8:]
    assert list(itertools.islice(training_problems(cfg), 8)) == used
    assert list(itertools.islice(training_problems(cfg, position=8), 4)) == rest


@pytest.mark.parametrize(
    "schedule, loss, refused, param",
    [
        ("truncated:24", "reverse_kl", None, None),  # H_max 256, but no rollout passes 24 tokens
        ("full", "reverse_kl", "reaches 256 tokens", "max_new_tokens"),
        ("progressive:h0=32,dh=32,every=8", "reverse_kl", "reaches 128 tokens", "schedule"),
        ("truncated:24", "forward_kl_topk", "--top-k 25", "top_k"),
    ],
)
def test_teacher_limits_hold_the_schedules_longest_horizon(student, schedule, loss, refused, param):
    cfg = RunConfig(schedule=schedule, loss=loss, top_k=25, steps=30)
    info = {"max_top_k": 20 if loss != "reverse_kl" else 0, "max_seq_len": 150, "vocab_size": 23}
    if refused is None:
        check_teacher_limits(cfg, [info], student[1], 23)
    else:
        with pytest.raises(RunError, match=refused) as error:
            check_teacher_limits(cfg, [info], student[1], 23)
        assert error.value.param == param


def test_a_student_with_ids_past_the_teachers_vocabulary_is_refused(student):
    """It could sample an id the teacher refuses to score, and fail a step; a teacher with the
    larger vocabulary (padded rows past the shared tokenizer's) is the common pair, and fine."""
    cfg = RunConfig(schedule="truncated:24", steps=30)
    info = {"max_top_k": 0, "max_seq_len": 150, "vocab_size": 32}
    check_teacher_limits(cfg, [info], student[1], 23)
    with pytest.raises(RunError, match="vocabulary of 40 ids, the teacher at .* of 32") as error:
        check_teacher_limits(cfg, [info], student[1], 40)
    assert error.value.param == "student"


class MergingTokenizer:
    """A tokenizer whose merges make the longest prompt one token, though others are longer."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [0]}

    def num_special_tokens_to_add(self) -> int:
        return 0


def test_teacher_limits_bound_the_prompt_by_characters_not_by_one_prompts_tokens():
    cfg = RunConfig(schedule="truncated:24", steps=30)
    info = {"max_top_k": 0, "max_seq_len": 24 + 10, "vocab_size": 23}
    with pytest.raises(RunError, match="prompts of up to 31"):
        check_teacher_limits(cfg, [info], MergingTokenizer(), 23)


def test_a_run_folder_it_cannot_write_is_a_clear_error(tmp_path, teacher_process):
    (tmp_path / "run" / "config.json").mkdir(parents=True)  # unwritable as a file, even by root
    result = trainer_cli(*small_args(teacher_process, tmp_path / "run"))
    assert result.returncode == 1 and "Is a directory" in result.stderr
    assert "config.json" in result.stderr and "Traceback" not in result.stderr


def test_an_out_that_cannot_be_a_folder_is_a_clear_error(tmp_path, teacher_process):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "run"):  # the folder, or one of those it would be made in
        result = trainer_cli(*small_args(teacher_process, out))
        assert result.returncode == 1 and "notes.txt is a file, not a folder" in result.stderr
        assert "Traceback" not in result.stderr


def test_resume_refuses_another_schedule_and_says_when_nothing_is_there(
    tmp_path, teacher_process, caplog
):
    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(out), resume=True)
    with caplog.at_level("WARNING", logger="opd.trainer"):
        run(cfg)
    assert "no checkpoint in" in caplog.text
    other = cfg.model_copy(update={"steps": 2, "schedule": "full"})
    with pytest.raises(RunError, match="trained with --schedule truncated:24 "):
        run(other)
    with pytest.raises(RunError, match="does not fit the student") as error:
        run(cfg.model_copy(update={"steps": 2, "student": str(TEACHER_PATH)}))
    assert error.value.param == "student"
    assert len(read_jsonl(out / "metrics.jsonl")) == 1
    # The same horizons written another way are the same schedule.
    assert run(cfg.model_copy(update={"schedule": "truncated:24.0"}))["steps"] == 1


def test_a_run_resumed_with_its_horizons_spelled_anew_resumes_again(tmp_path, teacher_process):
    """full at 24 tokens resumed as truncated:24 at 32: the same horizons, so taken, and the
    checkpoint it leaves pairs the new spec with the new H_max, so the same resume is taken again."""
    cfg = RunConfig(
        **{**SMALL, "schedule": "full"},
        max_new_tokens=24,
        teacher_url=[teacher_process],
        steps=1,
        out=str(tmp_path / "run"),
    )
    run(cfg)
    respelled = cfg.model_copy(
        update={"schedule": "truncated:24", "max_new_tokens": 32, "resume": True, "steps": 2}
    )
    assert run(respelled)["steps"] == 2
    assert run(respelled.model_copy(update={"steps": 3}))["steps"] == 3


def test_resume_refuses_fewer_steps_or_other_horizons_and_keeps_a_finished_run(
    tmp_path, teacher_process, monkeypatch
):
    out = tmp_path / "run"
    cfg = RunConfig(
        **{**SMALL, "schedule": "truncated:0.1"},
        teacher_url=[teacher_process],
        steps=2,
        out=str(out),
    )
    run(cfg)
    summary = (out / "summary.json").read_text()
    refused = [
        (dict(steps=1), "steps", "is at step 2, past --steps 1"),
        # A fraction of another H_max is another horizon (26 tokens of 256, 13 of 128).
        (
            dict(max_new_tokens=128),
            "max_new_tokens",
            "at --max-new-tokens 256; truncated:0.1 at 128",
        ),
        (dict(schedule="truncated:24"), "schedule", "trained with --schedule truncated:0.1"),
    ]
    for change, param, says in refused:
        with pytest.raises(RunError, match=says) as error:
            run(cfg.model_copy(update={"resume": True, **change}))
        assert error.value.param == param
    # Resumed as it is, a finished run has nothing left to do: it does not even load the student.
    monkeypatch.setattr(loop, "load_model", None)
    events = []
    assert run(cfg.model_copy(update={"resume": True}), events.append) == json.loads(summary)
    assert events == [{"type": "done", **json.loads(summary)}]  # a follower learns it is over
    assert (out / "summary.json").read_text() == summary
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [0, 2]
    weights = checkpoint.latest(out) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # damaged: refused before any work
    with pytest.raises(RunError, match="model.safetensors cannot be read") as error:
        run(cfg.model_copy(update={"resume": True}))
    assert error.value.param == "resume"


def test_a_finished_run_killed_before_its_summary_resumes_to_one_final_evaluation(
    tmp_path, teacher_process
):
    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(out))
    run(cfg)
    (out / "summary.json").unlink()  # as if killed between the last checkpoint and the summary
    assert run(cfg.model_copy(update={"resume": True}))["completed"]
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [0, 1]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]


def test_a_final_evaluation_that_fails_keeps_the_last_step(tmp_path, teacher_process, monkeypatch):
    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=2, out=str(out))
    evaluate = loop.evaluate

    def out_of_memory_after_step_0(model, tokenizer, problems, **kwargs):
        if read_jsonl(out / "eval.jsonl"):
            raise MemoryError("as a long final avg@k evaluation may")
        return evaluate(model, tokenizer, problems, **kwargs)

    monkeypatch.setattr(loop, "evaluate", out_of_memory_after_step_0)
    with pytest.raises(MemoryError):
        run(cfg)
    assert checkpoint.latest(out).name == checkpoint.step_name(2)  # no checkpoint was asked for
    monkeypatch.setattr(loop, "evaluate", evaluate)
    assert run(cfg.model_copy(update={"resume": True}))["completed"]
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [0, 2]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_a_stop_saves_before_the_evaluation_it_skips_and_resume_makes_it_up(
    tmp_path, teacher_process
):
    out = tmp_path / "run"
    cfg = RunConfig(
        **{**SMALL, "eval_every": 1}, teacher_url=[teacher_process], steps=3, out=str(out)
    )
    stop = threading.Event()
    summary = run(cfg, events=lambda e: e["type"] == "step" and stop.set(), stop=stop)
    assert summary["steps"] == 1 and not summary["completed"]
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [0]
    assert checkpoint.latest(out).name == checkpoint.step_name(1)
    assert run(cfg.model_copy(update={"resume": True}))["completed"]
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [0, 1, 2, 3]


def test_a_stop_during_the_last_step_skips_the_final_evaluation_and_resume_runs_it(
    tmp_path, teacher_process
):
    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(out))
    stop = threading.Event()
    summary = run(cfg, events=lambda e: e["type"] == "step" and stop.set(), stop=stop)
    assert summary["steps"] == 1 and not summary["completed"]
    assert summary["final_accuracy"] is None
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [0]
    resumed = run(cfg.model_copy(update={"resume": True}))
    assert resumed["completed"] and resumed["final_accuracy"] is not None
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [0, 1]


@pytest.mark.parametrize("at_step", [0, 2])
def test_a_stop_during_an_evaluation_ends_it_and_resume_makes_it_up(
    tmp_path, teacher_process, monkeypatch, at_step
):
    """A long evaluation must not hold up the stop's checkpoint (a server that shuts down gives
    its runs 2 minutes); one at the start or at the end is made up by --resume."""
    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=2, out=str(out))
    stop, evaluate, started = threading.Event(), loop.evaluate, []

    def a_stop_comes_meanwhile(model, tokenizer, problems, **kwargs):
        if len(started) == (at_step > 0):  # the step-0 evaluation is the first, the final one next
            stop.set()
        started.append(kwargs["stop"])
        return evaluate(model, tokenizer, problems, **kwargs)

    monkeypatch.setattr(loop, "evaluate", a_stop_comes_meanwhile)
    summary = run(cfg, events=lambda e: None, stop=stop)
    assert started[-1] is stop and not summary["completed"] and summary["final_accuracy"] is None
    assert summary["steps"] == at_step
    # The stopped evaluation left no record.
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == ([0] if at_step else [])
    monkeypatch.setattr(loop, "evaluate", evaluate)
    assert run(cfg.model_copy(update={"resume": True}))["completed"]
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [0, 2]


def test_a_run_says_when_it_has_started_and_from_which_step(tmp_path, teacher_process):
    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(out))
    events = []
    run(cfg, events=events.append)
    assert events[0] == {"type": "started", "step": 0, "resumed": False}
    events.clear()
    run(cfg.model_copy(update={"steps": 2, "resume": True}), events=events.append)
    assert events[0] == {"type": "started", "step": 1, "resumed": True}


def test_a_damaged_state_or_log_is_refused_naming_resume(tmp_path, teacher_process):
    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(out))
    run(cfg)
    more = cfg.model_copy(update={"resume": True, "steps": 2})
    state_file = checkpoint.latest(out) / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "step": "1"}))  # edited by hand
    with pytest.raises(RunError, match=r"state.json is unreadable \(step: ") as error:
        run(more)
    assert error.value.param == "resume"
    state_file.write_text(json.dumps(state))
    metrics = out / "metrics.jsonl"
    metrics.write_text("{oops\n" + metrics.read_text())  # not the torn tail a kill leaves
    with pytest.raises(RunError, match="metrics.jsonl: line 1 is not JSON") as error:
        run(more)
    assert error.value.param == "resume"
    # Refused, it leaves the settings the run was made with for the next --resume.
    assert json.loads((out / "config.json").read_text())["steps"] == 1


def test_a_run_is_never_overwritten_unless_asked(tmp_path, teacher_process, monkeypatch):
    out = tmp_path / "run"
    cfg = RunConfig(
        **SMALL, teacher_url=[teacher_process], steps=2, checkpoint_every=1, out=str(out)
    )
    saved = []
    save = checkpoint.save
    monkeypatch.setattr(
        checkpoint, "save", lambda *a, **k: saved.append(a[4].step) or save(*a, **k)
    )
    run(cfg)
    assert saved == [1, 2]  # the last step is saved once, never replaced by itself
    with pytest.raises(RunError, match="--resume to continue it, --overwrite to start over"):
        run(cfg.model_copy(update={"steps": 1}))
    assert len(read_jsonl(out / "metrics.jsonl")) == 2  # untouched
    run(cfg.model_copy(update={"steps": 1, "overwrite": True}))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert [p.name for p in checkpoint_dir(out).glob("step_*")] == ["step_000001"]
    # A run killed before its first checkpoint left its config and logs: they are kept too.
    (checkpoint_dir(out) / "latest").unlink()
    with pytest.raises(RunError, match="no checkpoint yet"):
        run(cfg)
    # Overwritten, the old run's summary goes with its checkpoints, even if the new run dies early.
    monkeypatch.setattr(loop.Run, "_final_evaluation", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run(cfg.model_copy(update={"steps": 1, "overwrite": True}))
    assert not (out / "summary.json").exists() and not (out / "accuracy.png").exists()


def test_overwrite_deletes_nothing_in_a_folder_that_holds_no_run(tmp_path, teacher_process):
    out = tmp_path / "project"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "notes.txt").write_text("not a run's")
    (out / "summary.json").write_text("{}")
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(out))
    run(cfg.model_copy(update={"overwrite": True}))
    assert (out / "checkpoints" / "notes.txt").read_text() == "not a run's"


def test_a_folder_of_a_runs_logs_alone_is_a_run_a_new_one_does_not_empty_unasked(
    tmp_path, teacher_process
):
    """A new run empties metrics.jsonl and eval.jsonl: with config.json gone (deleted, or copied
    without it), the logs were taken for a folder that holds no run and lost."""
    out = tmp_path / "logs"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(out))
    with pytest.raises(RunError, match="holds a run") as error:
        run(cfg)
    assert error.value.param == "out" and read_jsonl(out / "metrics.jsonl") == [{"step": 1}]
    with pytest.raises(RunError, match="nothing to resume") as error:  # it would empty them too
        run(cfg.model_copy(update={"resume": True}))
    assert error.value.param == "resume" and read_jsonl(out / "metrics.jsonl") == [{"step": 1}]
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "notes.txt").write_text("not a run's")
    assert run(cfg.model_copy(update={"overwrite": True}))["steps"] == 1
    assert (out / "checkpoints" / "notes.txt").exists()  # no checkpoint of a run: not deleted
    (out / "metrics.jsonl").write_text("")  # empty logs hold nothing
    shutil.rmtree(out / "checkpoints")
    (out / "config.json").unlink()
    (out / "eval.jsonl").write_text("")
    assert run(cfg)["steps"] == 1


def test_a_folder_whose_config_json_is_not_a_runs_is_never_written_over(tmp_path):
    """A model folder holds a config.json too: `--out models/x --resume` (or --overwrite, or
    through the API) wrote the run's own over it, and the model could no longer load."""
    model = tmp_path / "model"
    shutil.copytree(STUDENT_PATH, model)
    before = (model / "config.json").read_bytes()
    for change in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(RunError, match="holds a config.json that is not a run's") as error:
            check_out(RunConfig(**SMALL, out=str(model), **change))
        assert error.value.param == "out"
    assert (model / "config.json").read_bytes() == before


def test_a_folder_another_run_writes_into_is_refused_before_anything_is_touched(
    tmp_path, teacher_process
):
    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(out))
    run(cfg)
    held = loop.lock_out(out)  # as a run in another process holds it while it trains
    try:
        for change in ({"overwrite": True}, {"resume": True, "steps": 2}):
            with pytest.raises(RunError, match="is in use by another run") as error:
                run(cfg.model_copy(update=change))
            assert error.value.param == "out"
        assert checkpoint.latest(out).name == checkpoint.step_name(1)  # nothing was deleted
    finally:
        held.close()
    assert run(cfg.model_copy(update={"resume": True, "steps": 2}))["steps"] == 2


def test_a_run_that_wrote_into_the_folder_while_this_one_started_is_not_overwritten(
    tmp_path, teacher_process, monkeypatch
):
    # The folder is checked before a run connects to its teachers (which may wait minutes for a
    # loading teacher) and locked after; another run that started and wrote in between wins.
    out = tmp_path / "run"
    theirs = '{"theirs": true}'
    check_limits = loop.check_teacher_limits

    def another_run_writes(*args):
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text(theirs)
        return check_limits(*args)

    monkeypatch.setattr(loop, "check_teacher_limits", another_run_writes)
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(out))
    with pytest.raises(RunError, match="another run wrote into it") as error:
        run(cfg)
    assert error.value.param == "out"
    assert (out / "config.json").read_text() == theirs and not (out / "metrics.jsonl").exists()


def test_a_run_resumed_with_fewer_problems_a_step_goes_on_with_new_ones(tmp_path, teacher_process):
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(tmp_path / "run"))
    run(cfg)
    fewer = cfg.model_copy(update={"steps": 2, "resume": True, "prompts_per_step": 2})
    assert run(fewer)["completed"]
    assert checkpoint.read_state(checkpoint.latest(tmp_path / "run")).data_position == 4 + 2


def test_a_resumed_run_steps_with_the_weight_decay_it_is_given(
    tmp_path, teacher_process, monkeypatch
):
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=1, out=str(tmp_path / "run"))
    run(cfg)
    decays = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        decays.append(self.param_groups[0]["weight_decay"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    run(cfg.model_copy(update={"steps": 2, "resume": True, "weight_decay": 0.1}))
    assert decays == [0.1]  # not the 0.0 its checkpoint's optimizer state was saved with


def test_a_run_waits_for_a_teacher_still_loading_as_long_as_it_is_told(tmp_path):
    backend = SlowLoadBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app, ready_path="/health") as url:
        cfg = RunConfig(**SMALL, teacher_url=[url], steps=1, out=str(tmp_path / "run"))
        with pytest.raises(NotReady, match=f"teacher at {url}: model loading"):
            run(cfg.model_copy(update={"teacher_load_wait_s": 0.5}))
        threading.Timer(2.0, backend.release.set).start()
        assert run(cfg.model_copy(update={"teacher_load_wait_s": 60}))["completed"]


def test_a_stop_while_the_teacher_loads_ends_the_run_at_once_writing_nothing(tmp_path):
    """Ctrl-C, `docker stop` or POST /runs/{id}/stop must not wait out --teacher-load-wait-s."""
    backend = SlowLoadBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    with serve(app, ready_path="/health") as url:
        out = tmp_path / "run"
        cfg = RunConfig(**SMALL, teacher_url=[url], steps=1, out=str(out), teacher_load_wait_s=600)
        stop = threading.Event()
        threading.Timer(1.0, stop.set).start()
        try:
            summary = run(cfg, stop=stop)
        finally:
            backend.release.set()
    assert summary == {"schedule": cfg.schedule, "steps": 0, "completed": False}
    assert not out.exists()


def test_a_teacher_slower_than_the_timeout_names_the_setting_that_gives_it_longer(tmp_path, caplog):
    backend = GatedBackend(str(TEACHER_PATH))  # takes the rollouts, answers when the gate opens
    with serve(create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)) as url:
        cfg = RunConfig(**SMALL, teacher_url=[url], steps=1, out=str(tmp_path / "run"))
        try:
            with pytest.raises(RunError, match=r"within 1.5 s.*--teacher-timeout-s") as error:
                run(cfg.model_copy(update={"teacher_timeout_s": 1.5}))
            assert error.value.param == "teacher_timeout_s"
            # The stream's wait, then the rescue's (one /score request); not a third at the end.
            assert "trying again at the step's end" not in caplog.text
            # The teacher saw it given up.
            wait_for(lambda: metric(url, TEACHER_REQUESTS, route="/score", status="499") == 1)
            time.sleep(0.3)  # a second request, had one been sent, would be counted by now
            assert metric(url, TEACHER_REQUESTS, route="/score") == 1
            threading.Timer(3.0, backend.gate.set).start()  # slow, within a longer timeout
            slow_ok = {"teacher_timeout_s": 60, "overwrite": True}
            assert run(cfg.model_copy(update=slow_ok))["completed"]
        finally:
            backend.gate.set()


def test_a_teacher_with_an_api_key_needs_it_and_says_which_flag(tmp_path):
    app = create_app(TeacherSettings(model=str(TEACHER_PATH), api_key="s3cret"))
    with serve(app) as url:
        cfg = RunConfig(**SMALL, teacher_url=[url], steps=1, out=str(tmp_path / "run"))
        with pytest.raises(RunError, match="--api-key") as error:
            run(cfg.model_copy(update={"api_key": "wrong"}))
        assert error.value.param == "api_key" and url in str(error.value)
        assert run(cfg.model_copy(update={"api_key": "s3cret"}))["completed"]
    assert "s3cret" not in (tmp_path / "run" / "config.json").read_text()


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    other = teacher_with_another_tokenizer(tmp_path / "other-teacher")
    proc, url = start_teacher(str(other), threads=1)
    try:
        result = trainer_cli(*small_args(url, tmp_path / "run"))
    finally:
        stop(proc)
    assert result.returncode == 1
    assert "another tokenizer" in result.stderr and url in result.stderr


def test_a_killed_replica_loses_and_duplicates_nothing(tmp_path, teacher_process):
    doomed, doomed_url = start_teacher(str(TEACHER_PATH), threads=1)
    killed = threading.Event()

    def on_event(event):
        if event["type"] == "step" and event["step"] == 1:
            # Killed between steps 1 and 2, which the trainer does not know: step 2 still sends
            # it frames. (A timer that fired mid-step 2 raced the step: at a 24-token horizon a
            # step can be over first, leaving nothing to rescore.)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=30)
            killed.set()

    out = tmp_path / "run"
    cfg = RunConfig(
        **{**SMALL, "micro_batch": 2},
        student=str(STUDENT_PATH),
        out=str(out),
        steps=5,
        teacher_url=[doomed_url, teacher_process],
    )
    try:
        summary = run(cfg, events=on_event)
    finally:
        stop(doomed)
    assert killed.is_set() and summary["completed"]
    records = assert_every_step_once(out, 5)
    assert sum(r["rescored"] for r in records) >= 1  # the dead replica's work was redone elsewhere


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(out / "checkpoints" / latest / "model.safetensors")


def test_a_run_stopped_before_its_first_step_does_no_work(tmp_path, teacher_process):
    stopped = threading.Event()
    stopped.set()  # as a Ctrl-C while the run was still connecting
    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=3, out=str(out))
    summary = run(cfg, stop=stopped)
    assert summary["steps"] == 0 and not summary["completed"]
    assert not read_jsonl(out / "eval.jsonl") and checkpoint.latest(out) is None


def test_sigterm_stops_the_run_after_its_step_with_a_checkpoint(tmp_path, teacher_process):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.trainer.cli",
            "run",
            *small_args(teacher_process, out, 500),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not read_jsonl(out / "metrics.jsonl") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopping after this step" in stderr
    done = len(read_jsonl(out / "metrics.jsonl"))
    assert json.loads(stdout)["steps"] == done < 500 and "Traceback" not in stderr
    assert json.loads((checkpoint.latest(out) / "state.json").read_text())["step"] == done


def test_a_second_sigterm_gives_up_on_a_step_a_hung_teacher_holds_and_saves_the_one_before(
    tmp_path,
):
    """The step would wait for the teacher's timeout (2 minutes), past any stop grace period."""
    backend = HangingBackend(str(TEACHER_PATH))
    app = create_app(TeacherSettings(model=str(TEACHER_PATH)), backend=backend)
    out = tmp_path / "run"
    with serve(app) as url:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.trainer.cli", "run", *small_args(url, out, 500)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: len(read_jsonl(out / "metrics.jsonl")) >= 2, timeout=240)
            backend.hang.set()
            wait_for(backend.hanging.is_set, timeout=60)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # handled one at a time
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            backend.release.set()
            proc.kill()
    assert proc.returncode == 130 and "giving up on this step" in stderr, stderr
    steps = len(read_jsonl(out / "metrics.jsonl"))
    assert json.loads(stdout)["steps"] == steps and "Traceback" not in stderr
    assert checkpoint.latest(out).name == checkpoint.step_name(steps)


def test_killed_trainer_resumes_to_the_same_weights(tmp_path, teacher_process):
    # Enough steps, and a lower priority for the trainer than for this poll, that the kill lands
    # mid-run on a busy machine (with 6 steps of about 0.1 s, a CI run saw the run finish first).
    steps = 30
    straight = tmp_path / "straight"
    assert trainer_cli(*small_args(teacher_process, straight, steps)).returncode == 0

    resumed = tmp_path / "resumed"
    args = small_args(teacher_process, resumed, steps, "--checkpoint-every", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.trainer.cli", "run", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.nice(10),
    )
    deadline = time.monotonic() + 240
    while len(read_jsonl(resumed / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # some moment inside a later step
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(read_jsonl(resumed / "metrics.jsonl")) < steps, "killed too late to test resume"

    result = trainer_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert_every_step_once(resumed, steps)
    want, got = final_weights(straight), final_weights(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6, rtol=0), name


def test_a_run_whose_teacher_dies_keeps_its_steps_and_resumes_to_the_same_weights(
    tmp_path, teacher_process
):
    """No periodic checkpoints: the failure itself saves the last whole step (never lost work)."""
    straight = tmp_path / "straight"
    run(RunConfig(**SMALL, teacher_url=[teacher_process], steps=4, out=str(straight)))
    doomed, doomed_url = start_teacher(str(TEACHER_PATH), threads=1)

    def kill_after_step_2(event):
        if event["type"] == "step" and event["step"] == 2:
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=30)

    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[doomed_url], steps=4, out=str(out))
    try:
        with pytest.raises(TeacherError, match="unreachable"):
            run(cfg, events=kill_after_step_2)
    finally:
        stop(doomed)
    assert checkpoint.latest(out).name == checkpoint.step_name(2)
    resumed = {"teacher_url": [teacher_process], "resume": True}
    assert run(cfg.model_copy(update=resumed))["completed"]
    assert_every_step_once(out, 4)
    want, got = final_weights(straight), final_weights(out)
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6, rtol=0), name


def a_student_with_dropout(tmp_path) -> Path:
    student = tmp_path / "student-with-dropout"
    shutil.copytree(STUDENT_PATH, student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    return student


def test_a_student_with_dropout_trains_as_without_it_unless_asked(tmp_path, teacher_process):
    """Rollouts are sampled with dropout off; a training pass with it on would score the same
    tokens otherwise (ratios from 0 to 4.5 at dropout 0.1), noise in every advantage."""
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=2)
    run(cfg.model_copy(update={"out": str(tmp_path / "plain")}))
    with_dropout = cfg.model_copy(update={"student": str(a_student_with_dropout(tmp_path))})
    run(with_dropout.model_copy(update={"out": str(tmp_path / "off")}))
    run(with_dropout.model_copy(update={"out": str(tmp_path / "on"), "dropout": True}))
    want, off, on = (final_weights(tmp_path / name) for name in ("plain", "off", "on"))
    for name in want:
        assert torch.allclose(want[name], off[name], atol=1e-6, rtol=0), name
    # Adam moves each weight by about lr a step whatever the gradient, so dropout shows as a
    # fraction of lr (6e-5 at lr 1e-4), not as noise: the run without it matched to 1e-6 above.
    assert any(not torch.allclose(want[name], on[name], atol=1e-5, rtol=0) for name in want)


def test_a_step_failing_mid_update_saves_the_random_state_the_last_whole_step_left(
    tmp_path, teacher_process, monkeypatch
):
    """A student trained with its dropout draws from torch's generator in every training pass:
    the failed step's passes must not leak into the checkpoint, or the resumed run drops other
    units."""
    student = a_student_with_dropout(tmp_path)
    small = {**SMALL, "micro_batch": 4}  # two passes a step: the failure comes after the first
    cfg = RunConfig(
        **small, student=str(student), teacher_url=[teacher_process], steps=4, dropout=True
    )
    run(cfg.model_copy(update={"out": str(tmp_path / "straight")}))

    accumulate = loop.accumulate_gradients

    def fails_in_step_3(model, frames, cfg):
        if len(read_jsonl(out / "metrics.jsonl")) < 2:
            return accumulate(model, frames, cfg)
        first = next(iter(frames))
        accumulate(model, [first], cfg)  # one pass, dropout and all, then the failure
        raise MemoryError("as a long rollout's backward may")

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "accumulate_gradients", fails_in_step_3)
    with pytest.raises(MemoryError):
        run(cfg.model_copy(update={"out": str(out)}))
    assert checkpoint.latest(out).name == checkpoint.step_name(2)
    monkeypatch.setattr(loop, "accumulate_gradients", accumulate)
    assert run(cfg.model_copy(update={"out": str(out), "resume": True}))["completed"]
    want, got = final_weights(tmp_path / "straight"), final_weights(out)
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6, rtol=0), name


def test_a_listener_that_fails_costs_no_step_its_record_or_checkpoint(tmp_path, teacher_process):
    # As the control API's listener does when its event loop is gone: the step it was told of is
    # recorded and saved, so --resume goes on after it with no gap in metrics.jsonl.
    def gone(event):
        if event["type"] == "sample":
            raise RuntimeError("Event loop is closed")

    out = tmp_path / "run"
    cfg = RunConfig(**SMALL, teacher_url=[teacher_process], steps=2, out=str(out))
    with pytest.raises(RuntimeError, match="closed"):
        run(cfg, events=gone)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert checkpoint.latest(out).name == checkpoint.step_name(1)
    assert run(cfg.model_copy(update={"resume": True}))["completed"]
    assert_every_step_once(out, 2)


def test_the_peak_memory_of_runs_one_after_another_is_each_runs_own():
    """The demo trains its runs in one process: a later, smaller run must not report the peak of
    an earlier one (on Linux, where the peak can be reset)."""
    held = bytearray(256 * 2**20)  # touched, so resident: the earlier run's peak
    before = peak_memory("cpu")["peak_rss_mb"]
    del held
    reset_peak_rss()
    after = peak_memory("cpu")["peak_rss_mb"]
    if sys.platform == "linux":
        assert after < before - 200
    else:
        assert after == before


def test_peak_memory_names_the_gpu_only_for_a_student_on_one():
    assert set(peak_memory("cpu")) == {"peak_rss_mb"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_gpu_memory_counts_what_torch_allocated_there():
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    assert peak_memory("cuda")["peak_gpu_mb"] >= 64
    del block
