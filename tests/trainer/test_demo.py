"""The demo runs its schedules against a teacher and compares them; given --teacher-url it uses
that teacher instead of starting its own."""

from __future__ import annotations

from services.trainer.demo import DemoConfig, run_demo


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
