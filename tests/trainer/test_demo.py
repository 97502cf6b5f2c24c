"""The demo runs its schedules against a teacher and compares them; given --teacher-url it uses
that teacher instead of starting its own; stopped, it stops the teacher it started; bad settings
are one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from services.trainer.demo import DemoConfig, print_table, run_demo


def test_demo_uses_the_given_teacher_and_reports_each_schedule(tmp_path, teacher_url, capsys):
    cfg = DemoConfig(
        out=str(tmp_path),
        steps=1,
        eval_every=0,
        eval_n=4,
        schedules=("topd-10",),
        teacher_url=teacher_url,
    )
    [row] = run_demo(cfg)
    assert row["run"] == "topd-10" and row["teacher_tokens"] == row["tokens_generated"] > 0
    assert not (tmp_path / "teacher.log").exists()  # no teacher of its own was started
    assert (tmp_path / "comparison.png").is_file() and (tmp_path / "results.json").is_file()
    assert "topd-10" in capsys.readouterr().out


def test_the_table_shows_an_unknown_hidden_share_as_a_dash(capsys):
    # A vllm teacher does not time its forwards, so its runs have no hidden share to report.
    row = {
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
    print_table([{**row, "hidden": None}, {**row, "run": "popd", "hidden": 0.57}])
    full, popd = capsys.readouterr().out.strip().splitlines()[-2:]
    assert full.split()[-1] == "-" and popd.split()[-1] == "57%"


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


def test_bad_settings_are_one_line_errors_and_leave_no_folder(tmp_path):
    (tmp_path / "file").write_text("")
    for args, code, says in [
        (["--teacher-url", "notaurl"], 2, "--teacher-url"),
        (["--teacher-url", "http://127.0.0.1:1"], 1, "unreachable"),
        (["--out", str(tmp_path / "file")], 1, "is a file"),
    ]:
        out = ["--out", str(tmp_path / "run")] if "--out" not in args else []
        demo = opd("demo", "--steps", "1", "--schedules", "topd-10", *out, *args)
        _, err = demo.communicate(timeout=120)
        assert demo.returncode == code and says in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["file"]
