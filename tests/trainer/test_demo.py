"""The demo runs its schedules against a teacher and compares them; given --teacher-url it uses
that teacher instead of starting its own."""

from __future__ import annotations

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
