"""The bundled models load offline and sit in their accuracy bands on held-out problems."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers.utils import logging as hf_logging

from opd.bundled import STUDENT_PATH
from opd.evaluate import evaluate
from opd.models import (
    ModelLoadError,
    check_loadable,
    count_parameters,
    generation_config,
    load_model,
    load_tokenizer,
    stop_token_ids,
)
from shared.task import problems

# 200 held-out problems: a 95% band is then stable to about +-1.5 points, and it runs in seconds.
EVAL = problems("eval", 200, seed=0)


def test_student_is_at_most_a_quarter_of_the_teacher(teacher, student):
    assert count_parameters(student[0]) * 4 <= count_parameters(teacher[0])
    assert teacher[1].get_vocab() == student[1].get_vocab()
    for model in (teacher[0], student[0]):
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        assert head_dim in (32, 64)


def test_teacher_is_accurate(teacher):
    result = evaluate(*teacher, EVAL, progress=False)
    assert result.accuracy >= 0.95


def test_student_is_weak_but_well_formed(student):
    result = evaluate(*student, EVAL, progress=False)
    assert 0.10 <= result.accuracy <= 0.50
    assert result.well_formed >= 0.8


def test_a_device_the_machine_lacks_is_refused_before_loading():
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU; cuda:0 without any
    for device, says in [("gpu", "not a device name"), (missing, f"{missing}: ")]:
        with pytest.raises(ModelLoadError, match=says) as error:
            load_model(STUDENT_PATH, device=device)
        assert error.value.setting == "device"


def test_a_small_models_load_shows_no_transformers_bar_and_leaves_bars_on(capfd):
    load_model(STUDENT_PATH)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # a large model's load still shows its bar


def test_a_tokenizer_that_ships_its_own_code_is_refused_not_run(tmp_path, monkeypatch):
    # transformers asks on the terminal when trust_remote_code is unset: a "y" there (here, on
    # cue) would run the folder's code in the teacher or trainer.
    folder, ran = tmp_path / "custom", tmp_path / "ran"
    shutil.copytree(STUDENT_PATH, folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config |= {"tokenizer_class": "MyTok", "auto_map": {"AutoTokenizer": [None, "tok.MyTok"]}}
    config_file.write_text(json.dumps(config))
    (folder / "tok.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('yes')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class MyTok(PreTrainedTokenizerFast):\n    pass\n"
    )
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        load_tokenizer(folder)
    with pytest.raises(ModelLoadError):
        load_model(folder)
    assert not ran.exists()


def test_weights_behind_a_link_to_nothing_are_one_clear_error(tmp_path):
    # As a hub cache whose blobs were pruned leaves a snapshot folder.
    folder = tmp_path / "pruned"
    shutil.copytree(STUDENT_PATH, folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(ModelLoadError, match="unreadable weights file"):
        load_model(folder)


def test_a_folder_without_weights_is_refused_before_anything_is_loaded(tmp_path):
    """As a copy still in progress, or a checkout one level too high, leaves it: said by
    check_loadable, which servers call to refuse a model at once, not after they start."""
    folder = tmp_path / "no-weights"
    shutil.copytree(STUDENT_PATH, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights files \(\*.safetensors"):
        check_loadable(folder)
    check_loadable(STUDENT_PATH)


@pytest.mark.parametrize(
    "config, extra",
    [
        ('{"eos_token_id": [2, 7]}', {7}),
        ('{"eos_token_id": 9}', {9}),
        ('{"eos_token_id": [true, "x", 5]}', {5}),
        ("not json", set()),
        ("[2, 7]", set()),
    ],
)
def test_the_stop_ids_are_the_tokenizers_eos_and_the_generation_configs(tmp_path, config, extra):
    tokenizer = load_tokenizer(STUDENT_PATH)
    (tmp_path / "generation_config.json").write_text(config)
    want = {tokenizer.eos_token_id} | extra
    assert stop_token_ids(generation_config(tmp_path), tokenizer) == want
    assert stop_token_ids(generation_config(tmp_path / "none"), tokenizer) == {2}


def test_without_a_generation_config_the_stop_ids_come_from_the_models_config(tmp_path):
    """As transformers and vLLM make one from config.json then."""
    shutil.copytree(STUDENT_PATH, tmp_path / "student")
    folder = tmp_path / "student"
    (folder / "generation_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, 11]}))
    model, tokenizer = load_model(folder)
    assert stop_token_ids(generation_config(folder), tokenizer) == {2, 11}
    assert stop_token_ids(model.generation_config, tokenizer) == {2, 11}
