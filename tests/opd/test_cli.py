"""`opd` commands on bad input print one clear line and exit non-zero; on good input they work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from opd.bundled import STUDENT_PATH
from opd.cli import main
from opd.evaluate import evaluate
from opd.models import tiny_config
from shared.task import problems
from shared.tokenizer import build_tokenizer
from tests.conftest import main_imports_torch


def opd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opd.cli", *args], capture_output=True, text=True, timeout=300
    )


def mismatched_model(folder) -> None:
    """A model whose embedding has fewer rows than its tokenizer has tokens."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config("student", 10, 1, 2, 0)).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda d: d / "missing", "no such file or directory"),
        (lambda d: d, "not a Hugging Face model folder"),
        (lambda d: (d / "config.json").write_text("[1]") and d, "config.json is not a JSON object"),
        (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", "not a folder"),
        (
            lambda d: mismatched_model(d) or d,
            "tokenizer has 23 tokens but the model's vocab_size is 10",
        ),
    ],
)
def test_eval_on_bad_model_prints_one_line_and_fails(tmp_path, make, says):
    result = opd("eval", "--model", str(make(tmp_path)), "--n", "2")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert says in lines[0] and "Traceback" not in result.stderr


def test_eval_json_reports_accuracy_n_and_mean_tokens(student):
    result = opd("eval", "--model", str(STUDENT_PATH), "--n", "8", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # The same held-out problems (seed 0) evaluated here, in this process.
    want = evaluate(*student, problems("eval", 8, 0), progress=False)
    assert report["n"] == 8
    assert report["accuracy"] == want.accuracy
    assert report["mean_tokens"] == pytest.approx(want.mean_tokens) and want.mean_tokens > 50


def test_task_stats_prints_the_length_distribution():
    result = opd("task", "--stats", "--n", "500")
    assert result.returncode == 0
    assert "median 113" in result.stdout and "max 211" in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["task", "--stats", "--n", "0"],
        ["task", "--n", "-3"],
        ["eval", "--model", "models/tiny-student", "--n", "0"],
        ["eval", "--model", "models/tiny-student", "--batch-size", "0"],
        ["eval", "--model", "models/tiny-student", "--threads", "0"],
        ["eval", "--model", "models/tiny-student", "--samples", "0"],
    ],
)
def test_counts_below_one_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not a positive integer" in err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["task", "--n", "99999999999999999999"], "--n: 99999999999999999999 is more than 100000"),
        (["eval", "--model", "m", "--threads", "99999999999999999999"], "is more than 1024"),
        (["eval", "--model", "m", "--n", "100001"], "100001 is more than 100000"),
        (["eval", "--model", "m", "--samples", "1025"], "1025 is more than 1024"),
        (["eval", "--model", "m", "--batch-size", "2147483648"], "is more than 2147483647"),
        (["demo", "--eval-n", "99999999999999999999"], "--eval-n"),
    ],
)
def test_counts_above_their_caps_are_usage_errors_not_tracebacks_or_hours(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says in err


def test_make_models_refuses_an_out_dir_it_cannot_write_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = ["make-models", "--out-dir", str(tmp_path / "file"), "--only", "student"]
    assert main([*argv, "--student-steps", "1"]) == 2  # at once: no training step runs
    assert "--out-dir: cannot make" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--slip-max", "0"])
    assert "--slip-max" in capsys.readouterr().err


def test_a_model_named_twice_in_only_is_trained_once(tmp_path, capsys):
    argv = ["make-models", "--out-dir", str(tmp_path), "--only", "student", "student"]
    assert main([*argv, "--student-steps", "1", "--threads", "1"]) == 0
    assert capsys.readouterr().out.count("training student") == 1


@pytest.mark.parametrize("command", ["eval", "task", "demo", "make-models"])
def test_a_seed_outside_what_the_generators_take_is_a_usage_error(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--seed", str(2**64)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{2**64} is not a seed (0 to {2**32 - 1})" in err


def test_a_negative_demo_interval_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--eval-every", "-1"])
    assert exit_info.value.code == 2 and "-1 is negative" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--help"], ["eval", "--help"], ["demo", "--help"], ["task", "--n", "1"]]
)
def test_help_and_task_are_quick_because_they_do_not_import_torch(argv):
    assert not main_imports_torch("opd.cli", argv)
