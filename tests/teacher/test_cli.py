"""`opd-teacher serve` refuses bad settings in one line naming the flag and its environment variable,
and warns when it would serve everyone."""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch

from services.teacher.cli import (
    build_parser,
    main,
    open_access_warning,
    settings_from_args,
    startup_error,
)
from services.teacher.settings import TeacherSettings
from tests.conftest import main_imports_torch


def test_a_bad_device_is_refused_before_serving(capsys):
    assert main(["serve", "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "--device (or env OPD_TEACHER_DEVICE): 'gpu' is not a device name: use cpu, cuda" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max-body-mb", "inf"),  # every request's limit would be int(inf): a 500 each
        ("--max-body-mb", "nan"),
        ("--max-body-mb", "1e-9"),  # a limit of 0 bytes
        ("--max-batch-tokens", "1"),  # no sequence (a prompt token and one to score) fits
        ("--max-seq-len", "1"),
        ("--threads", "99999999999999999999"),  # torch.set_num_threads overflowed
        ("--host", ""),  # every address, as 0.0.0.0, for an unset `--host "$HOST"`
        ("--api-key", "s3cret\n"),  # no client can send it: every request a 401
        ("--api-key", "two words"),
    ],
)
def test_limits_that_could_serve_no_request_are_refused_before_serving(capsys, flag, value):
    assert main(["serve", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} (or env OPD_TEACHER_" in err and "Traceback" not in err


def test_a_bad_environment_value_names_its_variable(capsys, monkeypatch):
    monkeypatch.setenv("OPD_TEACHER_MAX_TOP_K", "abc")
    assert main(["serve"]) == 2
    assert "OPD_TEACHER_MAX_TOP_K" in capsys.readouterr().err


def test_a_misspelt_variable_is_named_in_a_warning_not_ignored_without_a_word(capsys, monkeypatch):
    monkeypatch.setenv("OPD_TEACHER_MAX_TOPK", "50")  # MAX_TOP_K
    monkeypatch.setenv("OPD_TEACHER_STREAMS", "3")  # compose's, for the trainer
    assert main(["serve", "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "warning: OPD_TEACHER_MAX_TOPK is no setting" in err and "STREAMS" not in err


def test_served_model_names_are_given_as_vllms_are():
    names = ["gpt-4-0613", " gpt-4 ", "gpt-4"]  # padded and repeated, as a script might
    args = build_parser().parse_args(["serve", "--served-model-name", *names])
    assert settings_from_args(args).served_names == ("gpt-4-0613", "gpt-4")


def test_an_empty_served_model_name_is_refused(capsys):
    assert main(["serve", "--served-model-name", " "]) == 2
    assert "--served-model-name (or env OPD_TEACHER_SERVED_MODEL_NAME)" in capsys.readouterr().err


def test_an_unknown_log_level_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--log-level", "loud"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "host, key, warns",
    [("0.0.0.0", "", True), ("0.0.0.0", "s3cret", False), ("127.0.0.1", "", False)],
)
def test_serving_beyond_loopback_without_a_key_warns(host, key, warns):
    warning = open_access_warning(TeacherSettings(host=host, api_key=key))
    assert (warning is not None) == warns
    if warns:
        assert "no API key" in warning and host in warning


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"]])
def test_help_is_quick_because_it_does_not_import_torch(argv):
    assert not main_imports_torch("services.teacher.cli", argv)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_the_vllm_backend_without_vllm_is_refused_saying_how_to_install_it(capsys):
    assert main(["serve", "--backend", "vllm"]) == 2
    assert "pip install -e '.[vllm]'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_without_cuda_is_refused_before_serving():
    said = startup_error(TeacherSettings(device="cuda:0"))
    assert said == "--device cuda:0: CUDA is not available here"


def test_a_folder_that_is_not_a_model_is_refused_before_serving(tmp_path):
    assert "no config.json" in startup_error(TeacherSettings(model=str(tmp_path)))
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    assert "unreadable config.json" in startup_error(TeacherSettings(model=str(tmp_path)))
    assert startup_error(TeacherSettings(port=0)) is None  # the bundled teacher


def test_a_port_in_use_is_refused_before_serving():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = startup_error(TeacherSettings(port=port))
    assert error.startswith("--port cannot listen") and "Address already in use" in error


@pytest.mark.parametrize("host", ["192.0.2.1", "999.1.1.1"])  # not this machine's; no address
def test_a_host_it_cannot_listen_on_is_refused_naming_host(host):
    assert startup_error(TeacherSettings(host=host, port=8123)).startswith("--host cannot listen")


def test_a_sequence_limit_beyond_the_batch_budget_is_refused_before_serving():
    error = startup_error(TeacherSettings(max_seq_len=400, max_batch_tokens=100))
    assert "--max-seq-len 400 exceeds --max-batch-tokens 100" in error


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")
def test_the_vllm_backend_refuses_a_folder_that_is_not_a_model_before_serving(tmp_path):
    assert "no config.json" in startup_error(TeacherSettings(backend="vllm", model=str(tmp_path)))


def test_a_sequence_limit_beyond_the_models_positions_is_capped_with_a_warning(caplog):
    from opd.bundled import TEACHER_PATH
    from services.teacher.backends.hf import HFBackend

    with caplog.at_level("WARNING"):
        info = HFBackend(str(TEACHER_PATH), max_seq_len=100_000, max_batch_tokens=200_000).load()
    assert info.max_seq_len == 512 and "beyond the model's 512 positions" in caplog.text
