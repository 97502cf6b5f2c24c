"""`opd-trainer` refuses bad settings in one line that names them where the user wrote them (a flag,
or a key of the --config file), before any model is loaded."""

from __future__ import annotations

import json
import socket

import pytest

from services.trainer.cli import build_parser, config_from_args, main
from services.trainer.config import RunConfig
from tests.conftest import main_imports_torch


def errors_of(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("bad.yaml", "steps: [1\n", "not valid YAML"),
        ("bad.toml", "steps = = 3\n", "not valid TOML"),
        ("list.yaml", "- steps\n", "expected a mapping"),
        (
            "twice.yaml",
            "lr: 1.0e-4\nsteps: 3\nlr: 3.0e-4\n",
            "'lr' is given twice (line 3, column 1)",
        ),
        ("twice.toml", "lr = 1e-4\nlr = 3e-4\n", "not valid TOML"),
        ("number.yaml", "steps: 3\n1: 2\n", "not of type int (line 2, column 1)"),
        ("list_key.yaml", "? [a, b]\n: 2\n", "not of type list (line 1, column 3)"),
        ("run.ini", "steps=3\n", ".yaml, .yml or .toml"),
        ("latin1.yaml", b"# caf\xe9\nsteps: 3\n", "not UTF-8 text"),
    ],
)
def test_an_unreadable_config_file_is_named(tmp_path, capsys, name, text, says):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    err = errors_of(capsys, "run", "--config", str(path))
    assert str(path) in err and says in err
    assert "<unicode string>" not in err and "^" not in err and len(err.strip().splitlines()) == 1


def test_a_missing_config_file_names_the_flag(tmp_path, capsys):
    err = errors_of(capsys, "run", "--config", str(tmp_path / "none.yaml"))
    assert f"--config {tmp_path / 'none.yaml'}: No such file or directory" in err


def test_a_bad_key_in_the_config_file_is_named_as_the_file_wrote_it(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("prompts-per-step: 2\nsteps: 0\n")
    err = errors_of(capsys, "run", "--config", str(path))
    assert f"{path}: prompts-per-step: not a setting (keys are written with underscores" in err
    assert f"{path}: steps: Input should be greater than or equal to 1" in err
    # A flag that overrides the file's bad value is named as the flag.
    err = errors_of(capsys, "run", "--config", str(path), "--steps", "-1")
    assert "--steps: Input should be greater" in err and f"{path}: steps" not in err


def test_a_bad_flag_is_named_without_pydantic_prefixes(capsys):
    err = errors_of(capsys, "run", "--schedule", "sometimes")
    assert "opd-trainer: error: --schedule: " in err and "Value error" not in err


def test_a_negative_learning_rate_is_refused_by_its_check_not_taken_for_a_flag(capsys):
    err = errors_of(capsys, "run", "--lr", "-1e-4")
    assert "opd-trainer: error: --lr: Input should be greater than 0" in err


def test_one_teacher_url_may_be_a_plain_string_in_a_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('teacher_url = "http://10.0.0.5:8000/"\nsteps = 3\n')
    cfg = config_from_args(build_parser().parse_args(["run", "--config", str(path)]))
    assert cfg.teacher_url == ["http://10.0.0.5:8000"] and cfg.steps == 3


def test_plot_refuses_folders_without_evaluations_and_non_png_output(tmp_path, capsys):
    err = errors_of(capsys, "plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "p.png"))
    assert "no evaluations in" in err and not (tmp_path / "p.png").exists()
    (tmp_path / "eval.jsonl").write_text("")
    err = errors_of(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "p.png"))
    assert "no evaluations in" in err and not (tmp_path / "p.png").exists()
    (tmp_path / "eval.jsonl").write_text('{"step": 0}\ngarbage\n')
    err = errors_of(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "p.png"))
    assert f"{tmp_path / 'eval.jsonl'}: line 2 is not JSON" in err
    (tmp_path / "eval.jsonl").write_text('{"step": 0}\n')
    err = errors_of(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "p.png"))
    assert f"{tmp_path / 'eval.jsonl'}: record 1 is not an evaluation" in err
    typed = '{"step": "a", "accuracy": "x", "train_s": null, "teacher_tokens": {}}\n'
    (tmp_path / "eval.jsonl").write_text(typed)  # every field there, none a number
    err = errors_of(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "p.png"))
    assert f"{tmp_path / 'eval.jsonl'}: record 1 is not an evaluation" in err
    (tmp_path / "eval.jsonl").write_bytes(b"\xff\n")
    err = errors_of(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "p.png"))
    assert f"{tmp_path / 'eval.jsonl'}: not UTF-8 text" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path), "--out", str(tmp_path / "p.txt")])
    assert exit_info.value.code == 2 and ".png" in capsys.readouterr().err


def test_plot_names_a_file_where_its_out_needs_a_folder(tmp_path, capsys):
    (tmp_path / "eval.jsonl").write_text(
        '{"step": 0, "accuracy": 0.5, "train_s": 0, "teacher_tokens": 0}\n'
    )
    (tmp_path / "afile").write_text("")
    err = errors_of(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "afile" / "p.png"))
    assert f"a file is in the way of the folder {tmp_path / 'afile'}" in err


def test_serve_refuses_a_port_in_use_in_one_line_naming_the_flag(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"opd-trainer: error: --port cannot listen on 127.0.0.1:{port}: ")
    assert len(err.splitlines()) == 1


def test_serve_refuses_a_port_out_of_range(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "99999"])
    assert exit_info.value.code == 2 and "not a TCP port" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["serve", "--help"]])
def test_help_is_quick_because_it_does_not_import_torch(argv):
    assert not main_imports_torch("services.trainer.cli", argv)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--teacher-url", "http://127.0.0.1:99999"], "port 99999 out of range"),
        (["--teacher-url", "http://127.0.0.1:abc"], "is not a URL"),
        (["--teacher-url", "http://"], "with a host"),
        (["--schedule", "truncated:300"], "beyond H_max = 256"),
        (["--schedule", "truncated:2.5"], "a whole number"),
        (["--schedule", "linear:h0=300,steps=2"], "beyond H_max"),
        (["--out", ""], "--out: String should have at least 1 character"),
        (["--teacher-url", "http://h\n:1"], "is not a URL"),
        # Else kept in config.json, the run's views and logs.
        (["--teacher-url", "http://alice:s3cret@h:1"], "may not hold a user name or password"),
        (["--schedule", "truncated:nan"], "R must be a number > 0"),
        (["--student", "~nosuchuser/model"], "--student: cannot expand ~"),
        (["--out", "o" * 5000], "--out: not a usable path (File name too long)"),
        (["--api-key", "key\n"], "--api-key: an API key may hold only visible ASCII"),
        (["--eval-n", "99999999999999999999"], "--eval-n: Input should be less than or equal"),
        (["--threads", "99999999999999999999"], "--threads: Input should be less than or equal"),
        (["--eval-samples", "1025"], "--eval-samples: Input should be less than or equal"),
    ],
)
def test_settings_that_could_only_fail_later_or_be_changed_silently_are_refused(
    capsys, flags, says
):
    assert says in errors_of(capsys, "run", *flags)


def test_a_schedule_is_checked_against_the_runs_own_max_new_tokens(capsys):
    args = ["run", "--schedule", "truncated:100", "--max-new-tokens", "100"]
    assert config_from_args(build_parser().parse_args(args)).schedule == "truncated:100"
    err = errors_of(capsys, "run", "--schedule", "truncated:200", "--max-new-tokens", "100")
    assert "--schedule: " in err  # within the default H_max, beyond this run's


def test_the_teachers_key_comes_from_its_variable_unless_given(monkeypatch):
    monkeypatch.setenv("OPD_TEACHER_API_KEY", "s3cret")
    parse = build_parser().parse_args
    assert config_from_args(parse(["run"])).api_key == "s3cret"
    assert config_from_args(parse(["run", "--api-key", "mine"])).api_key == "mine"
    # The control API builds its configs without it: a caller could name its own teacher_url.
    assert RunConfig().api_key is None
    monkeypatch.setenv("OPD_TEACHER_API_KEY", "")  # as compose passes an unset variable
    assert config_from_args(parse(["run"])).api_key is None


def test_a_key_from_the_variable_that_no_header_can_carry_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("OPD_TEACHER_API_KEY", "a b")
    err = errors_of(capsys, "run")
    assert "env OPD_TEACHER_API_KEY: an API key may hold only visible ASCII" in err
    assert "--api-key" not in err


def test_serve_refuses_an_empty_host_which_would_listen_everywhere(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--host", ""])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--host: " in err and "every address" in err


def test_max_new_tokens_stops_where_evaluation_does(capsys):
    err = errors_of(capsys, "run", "--max-new-tokens", "300")
    assert "--max-new-tokens: Input should be less than or equal to 256" in err


def test_resume_continues_with_the_settings_the_run_began_with(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    began = RunConfig(
        out=str(out), teacher_url=["http://10.0.0.5:8000"], schedule="truncated:40", steps=4
    )
    (out / "config.json").write_text(began.model_dump_json())
    args = ["run", "--out", str(out), "--resume", "--steps", "10"]
    cfg = config_from_args(build_parser().parse_args(args))
    assert cfg.teacher_url == ["http://10.0.0.5:8000"] and cfg.schedule == "truncated:40"
    assert cfg.steps == 10 and cfg.resume
    err = capsys.readouterr().err
    assert "resuming with changed settings: steps 4 -> 10" in err
    assert "does nothing" not in err  # the saved top_k was never given by the user
    # Without --resume the folder's settings are not read (and the run is refused later).
    fresh = config_from_args(build_parser().parse_args(["run", "--out", str(out)]))
    assert fresh.schedule == "full"


def test_resume_reads_the_settings_of_a_folder_given_with_a_tilde(tmp_path, monkeypatch):
    """--out=~/run reaches the trainer unexpanded; the run expands it, and so must --resume's
    reading of its config.json (it read none, and went on with the defaults)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").mkdir()
    began = RunConfig(out=str(tmp_path / "run"), schedule="truncated:40", steps=4, lr=1e-3)
    (tmp_path / "run" / "config.json").write_text(began.model_dump_json())
    cfg = config_from_args(build_parser().parse_args(["run", "--out=~/run", "--resume"]))
    assert cfg.out == str(tmp_path / "run") and cfg.schedule == "truncated:40"
    assert cfg.steps == 4 and cfg.lr == 1e-3


def test_a_bad_max_new_tokens_is_the_only_error_not_a_schedule_beyond_a_default(capsys):
    err = errors_of(capsys, "run", "--max-new-tokens", "0", "--schedule", "truncated:300")
    assert "--max-new-tokens:" in err and "--schedule" not in err


def test_resume_reads_the_folder_it_was_given_and_names_its_files_bad_settings(tmp_path, capsys):
    out = tmp_path / "moved"
    out.mkdir()
    saved = RunConfig(out="/where/it/was/made", schedule="truncated:40").model_dump()
    (out / "config.json").write_text(json.dumps({**saved, "old_setting": 1}))
    args = ["run", "--out", str(out) + "/", "--resume", "--no-progress"]
    cfg = config_from_args(build_parser().parse_args(args))
    assert cfg.out == str(out) + "/" and cfg.schedule == "truncated:40"  # an older key is dropped
    assert "changed settings" not in capsys.readouterr().err  # out and progress do not count
    (out / "config.json").write_text(json.dumps({**saved, "steps": 0}))
    err = errors_of(capsys, "run", "--out", str(out), "--resume")
    assert f"{out / 'config.json'}: steps: Input should be greater" in err


@pytest.mark.parametrize(
    "name, text, key",
    [
        ("run.yaml", "steps: true\n", "steps"),  # not 1
        ("run.toml", 'steps = "2"\n', "steps"),  # not 2
        ("run.yaml", "resume: 'yes'\n", "resume"),
        ("run.yaml", "out: 5\nresume: true\n", "out"),
    ],
)
def test_a_config_file_value_of_the_wrong_type_is_refused_not_converted(
    tmp_path, capsys, name, text, key
):
    path = tmp_path / name
    path.write_text(text)
    assert f"{path}: {key}: Input should be a valid" in errors_of(
        capsys, "run", "--config", str(path)
    )


def test_integer_flags_are_read_as_integers(capsys):
    cfg = config_from_args(build_parser().parse_args(["run", "--steps", "7", "--threads", "2"]))
    assert cfg.steps == 7 and cfg.threads == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--steps", "seven"])
    assert exit_info.value.code == 2 and "--steps: invalid int value" in capsys.readouterr().err


def test_a_flag_the_loss_ignores_gets_a_note(capsys):
    config_from_args(build_parser().parse_args(["run", "--top-k", "50"]))
    assert "note: --top-k does nothing with --loss reverse_kl" in capsys.readouterr().err
