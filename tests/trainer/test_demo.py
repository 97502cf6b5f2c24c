"""The demo runs its schedules against a teacher and compares them; given --teacher-url it uses
that teacher instead of starting its own; stopped, it stops the teacher it started; bad settings
are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd.bundled import TEACHER_PATH
from opd.models import ModelLoadError
from services.teacher.app import create_app
from services.teacher.settings import TeacherSettings
from services.trainer.config import RunConfig
from services.trainer.demo import (
    SCHEDULES,
    DemoConfig,
    against_full,
    hidden_share,
    print_table,
    run_configs,
    run_demo,
)
from services.trainer.loop import run
from services.trainer.report import JsonlLog
from shared.errors import TeacherError
from tests.conftest import a_closed_port, serve
from tests.trainer.test_loop import SMALL


def test_demo_uses_the_given_teacher_and_reports_each_schedule(tmp_path, teacher_url, capsys):
    cfg = DemoConfig(
        out=str(tmp_path),
        steps=1,
        eval_every=0,
        eval_n=4,
        schedules=("topd-10",),
        teacher_url=teacher_url,
        run_settings={"eval_samples": 2},
    )
    [row] = run_demo(cfg)
    assert row["run"] == "topd-10" and row["teacher_tokens"] == row["tokens_generated"] > 0
    assert 0 <= row["avg@2"] <= 1  # the final evaluation's, with the demo's --eval-samples 2
    assert not (tmp_path / "teacher.log").exists()  # no teacher of its own was started
    assert (tmp_path / "comparison.png").is_file() and (tmp_path / "results.json").is_file()
    table = capsys.readouterr().out
    assert "topd-10" in table and "avg@2 end" in table


# A row of the demo's table, as _row makes it.
ROW = {
    "run": "full",
    "schedule": "full",
    "initial_accuracy": 0.19,
    "final_accuracy": 0.2,
    "train_s": 1.0,
    "tokens_generated": 10,
    "teacher_tokens": 10,
    "peak_rss_mb": 100.0,
    "generate_s": 0.1,
    "teacher_wait_s": 0.1,
    "update_s": 0.1,
}


def test_the_table_shows_an_unknown_hidden_share_as_a_dash(capsys):
    # A vllm teacher does not time its forwards, so its runs have no hidden share to report.
    row = ROW
    print_table([{**row, "hidden": None}, {**row, "run": "popd", "hidden": 0.57}])
    lines = capsys.readouterr().out.strip().splitlines()
    full, popd = lines[2:4]  # under the heading and its rule
    # The hidden share is the column before "matches full" ("-": no full run was compared).
    assert full.split()[-2:] == ["-", "-"] and popd.split()[-2:] == ["57%", "-"]


def test_the_hidden_share_is_of_the_runs_whole_scoring_time_not_a_mean_of_its_steps():
    # 3 s of scoring all hidden and 1 s not hidden at all: 3 of 4 seconds were hidden (a mean of
    # the steps' shares would say 50%). The untimed step (a vllm teacher's) counts for neither.
    steps = [
        {"teacher_wait_s": 0.0, "teacher_compute_s": 3.0},
        {"teacher_wait_s": 1.0, "teacher_compute_s": 1.0},
        {"teacher_wait_s": 5.0, "teacher_compute_s": 0.0},
    ]
    assert hidden_share(steps) == pytest.approx(0.75)
    assert hidden_share(steps[2:]) is None
    assert hidden_share([{"teacher_wait_s": 2.0, "teacher_compute_s": 1.0}]) == 0.0


def evals(run: Path, *points: tuple[float, float]) -> None:
    """Writes `run`/eval.jsonl with one evaluation per (train_s, accuracy), a step apart."""
    log = JsonlLog(run / "eval.jsonl")
    for step, (train_s, accuracy) in enumerate(points):
        log.write({"step": step, "accuracy": accuracy, "train_s": train_s, "teacher_tokens": step})


def test_a_run_on_a_gpu_shows_its_gpu_memory_beside_its_resident_memory(capsys):
    print_table(
        [{**ROW, "hidden": None}, {**ROW, "run": "popd", "hidden": None, "peak_gpu_mb": 812.4}]
    )
    out = capsys.readouterr().out
    cpu_row, gpu_row = [line for line in out.splitlines() if line.startswith(("full ", "popd "))]
    assert " 100 " in cpu_row and " 100/812 " in gpu_row
    assert "the GPU memory torch allocated" in out


def test_each_run_is_timed_to_within_2_points_of_full_opds_final_accuracy(tmp_path):
    evals(tmp_path / "full", (0, 0.19), (10, 0.25), (20, 0.30))
    evals(tmp_path / "topd-50", (0, 0.19), (4, 0.275), (8, 0.35))  # 27.5% is 2.5 points short
    evals(tmp_path / "popd", (0, 0.19), (6, 0.28), (12, 0.29))  # 28% is within 2 points of 30%
    evals(tmp_path / "topd-10", (0, 0.19), (2, 0.10))
    rows = [
        {"run": name, "final_accuracy": acc, "train_s": s}
        for name, acc, s in [
            ("full", 0.30, 20),
            ("topd-50", 0.35, 8),
            ("popd", 0.29, 12),
            ("topd-10", 0.10, 2),
        ]
    ]
    against_full(rows, tmp_path)
    reached = {r["run"]: (r["matches_full_s"], r["matches_full_fraction"]) for r in rows}
    assert reached == {
        "full": (20, 1.0),
        "topd-50": (8, 0.4),
        "popd": (6, 0.3),
        "topd-10": (None, None),
    }


def test_without_a_full_run_nothing_is_compared(tmp_path):
    evals(tmp_path / "popd", (0, 0.19))
    rows = [{"run": "popd", "final_accuracy": 0.19, "train_s": 1}]
    against_full(rows, tmp_path)
    assert "matches_full_s" not in rows[0]


@pytest.mark.parametrize("final", [0.1, 0.205])  # below its 19% start, or 1.5 points above it
def test_the_table_says_when_matching_full_opd_means_nothing(capsys, final):
    # Full OPD ended within 2 points of its start or below: every run "matched" it at step 0.
    row = {**ROW, "final_accuracy": final, "hidden": 0.5}
    row |= {"matches_full_s": 0.0, "matches_full_fraction": 0.0}
    print_table([{**row, "run": "full"}, {**row, "run": "popd", "matches_full_s": None}])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[2].endswith("0.0 s (0%)") and lines[3].endswith("never")
    assert "says nothing about the schedules" in out


def opd(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "opd.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_a_demo_stopped_by_sigterm_stops_its_teacher(tmp_path):
    demo = opd(
        "demo", "--steps", "500", "--eval-n", "2", "--schedules", "topd-10", "--out", str(tmp_path)
    )
    try:
        assert demo.stdout.readline().startswith("== topd-10")  # the teacher is up
        [teacher] = Path(f"/proc/{demo.pid}/task/{demo.pid}/children").read_text().split()
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 130
        assert "interrupted" in demo.stderr.read()
        assert not Path(f"/proc/{teacher}").exists()  # stopped and reaped, not orphaned
    finally:
        demo.kill()


def test_the_demo_sends_the_key_in_the_teachers_variable(tmp_path):
    keyed = create_app(TeacherSettings(model=str(TEACHER_PATH), api_key="s3cret"))
    with serve(keyed) as url:
        args = ["--steps", "1", "--eval-n", "2", "--schedules", "topd-10", "--teacher-url", url]
        for key, code in [("s3cret", 0), ("", 1)]:  # empty, as compose passes unset: no key
            env = {**os.environ, "OPD_TEACHER_API_KEY": key}
            demo = opd("demo", *args, "--out", str(tmp_path / f"run{code}"), env=env)
            _, err = demo.communicate(timeout=120)
            assert demo.returncode == code, err
        assert "missing or wrong API key" in err


def test_bad_settings_are_one_line_errors_and_leave_no_folder(tmp_path):
    (tmp_path / "file").write_text("")
    cases = [
        (["--teacher-url", "notaurl"], 2, "--teacher-url"),
        (["--teacher-url", "http://127.0.0.1:1"], 1, "unreachable"),
        (["--out", str(tmp_path / "file")], 1, "is a file"),
        (["--lr", "-1"], 2, "--lr: Input should be greater than 0"),
        (["--device", "gpu"], 2, "--device"),
        (["--teacher-url", ""], 2, "--teacher-url"),  # not "start a teacher of your own"
        (["--out", ""], 2, "--out: an empty folder name"),  # not the current directory
    ]
    demos = []  # started together: each spends seconds importing torch
    for args, code, says in cases:
        out = ["--out", str(tmp_path / "run")] if "--out" not in args else []
        demos.append(
            (opd("demo", "--steps", "1", "--schedules", "topd-10", *out, *args), code, says)
        )
    for demo, code, says in demos:
        _, err = demo.communicate(timeout=120)
        assert demo.returncode == code and says in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_the_demo_refuses_to_replace_a_run_it_did_not_make(tmp_path, teacher_url):
    """`opd demo --out runs` beside a user's runs/full: its folder would be the demo's full run."""
    mine = tmp_path / "full"
    run(RunConfig(**SMALL, steps=1, teacher_url=[teacher_url], out=str(mine)))
    before = sorted(p.name for p in mine.iterdir())
    cfg = DemoConfig(
        out=str(tmp_path), steps=1, eval_n=2, schedules=("full",), teacher_url=teacher_url
    )
    with pytest.raises(FileExistsError, match="full holds a run the demo did not make"):
        run_demo(cfg)
    assert (
        sorted(p.name for p in mine.iterdir()) == before and not (tmp_path / "demo.json").exists()
    )


def test_a_demo_of_some_schedules_does_not_claim_the_run_folders_of_others(tmp_path, teacher_url):
    """Its mark names the folders it made: a later demo of every schedule must still refuse the
    user's runs/popd beside them."""
    mine = tmp_path / "popd"
    run(RunConfig(**SMALL, steps=1, teacher_url=[teacher_url], out=str(mine)))
    some = DemoConfig(
        out=str(tmp_path), steps=1, eval_n=2, schedules=("topd-10",), teacher_url=teacher_url
    )
    run_demo(some)
    every = DemoConfig(out=str(tmp_path), steps=1, eval_n=2, teacher_url=teacher_url)
    with pytest.raises(FileExistsError, match="popd holds a run the demo did not make"):
        run_demo(every)
    run_demo(some)  # its own folder it redoes
    assert json.loads((tmp_path / "demo.json").read_text())["schedules"] == ["topd-10"]


def test_a_demo_that_cannot_start_keeps_the_earlier_demos_table(tmp_path, teacher_url):
    """Its results were deleted before any work: a demo pointed at a teacher that is down left the
    earlier runs without their table and plot."""
    cfg = DemoConfig(
        out=str(tmp_path), steps=1, eval_n=2, schedules=("topd-10",), teacher_url=teacher_url
    )
    run_demo(cfg)
    table = (tmp_path / "results.json").read_text()
    down = f"http://127.0.0.1:{a_closed_port()}"
    with pytest.raises(TeacherError, match="unreachable"):
        run_demo(DemoConfig(**{**vars(cfg), "teacher_url": down}))
    assert (tmp_path / "results.json").read_text() == table
    assert (tmp_path / "comparison.png").is_file()


def test_the_demo_checks_the_folder_it_writes_when_out_starts_with_a_tilde(
    tmp_path, teacher_url, monkeypatch
):
    """--out=~/runs reaches the demo unexpanded (a shell expands ~ only at a word's start); each
    run expands it, so the check must look there too, not in a folder named ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "runs" / "full"
    run(RunConfig(**SMALL, steps=1, teacher_url=[teacher_url], out=str(mine)))
    cfg = DemoConfig(out="~/runs", steps=1, eval_n=2, schedules=("full",), teacher_url=teacher_url)
    with pytest.raises(FileExistsError, match="full holds a run the demo did not make"):
        run_demo(cfg)
    assert not (tmp_path / "~").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU it asks for")
def test_a_gpu_this_machine_lacks_is_refused_before_a_teacher_starts(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "run"), run_settings={"device": "cuda"})
    with pytest.raises(ModelLoadError, match="--device cuda: CUDA is not available"):
        run_demo(cfg)
    assert not (tmp_path / "run").exists()


def test_every_run_gets_the_demos_run_settings():
    settings = {"prompts_per_step": 64, "samples_per_prompt": 2, "micro_batch": 32, "lr": 1e-4}
    cfg = DemoConfig(schedules=("full", "popd"), run_settings=settings)
    runs = run_configs(cfg, "http://127.0.0.1:8000")
    assert [r.schedule for r in runs.values()] == [SCHEDULES["full"], SCHEDULES["popd"]]
    assert all(r.model_dump(include=set(settings)) == settings for r in runs.values())


def test_the_demo_distils_with_the_top_k_forward_kl_unless_told_otherwise():
    runs = run_configs(DemoConfig(schedules=("full",)), "http://127.0.0.1:8000")
    assert runs["full"].loss == "forward_kl_topk"
    told = DemoConfig(schedules=("full",), run_settings={"loss": "reverse_kl"})
    assert run_configs(told, "http://127.0.0.1:8000")["full"].loss == "reverse_kl"


def test_the_demo_refuses_run_settings_it_sets_itself():
    with pytest.raises(ValueError, match=r"not \['out'\]"):
        DemoConfig(run_settings={"out": "elsewhere"})


def test_the_table_has_no_such_warning_when_full_opd_gained(capsys):
    row = {**ROW, "final_accuracy": 0.3, "hidden": 0.5, "matches_full_s": 1.0}
    print_table([{**row, "matches_full_fraction": 1.0}])
    out = capsys.readouterr().out
    assert "matches full: when a run first came within 2 points" in out
    assert "says nothing" not in out
