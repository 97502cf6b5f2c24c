"""RunConfig accepts what the trainer can use and names the field it refuses."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from services.trainer.config import RunConfig
from tests.conftest import schema_keys


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_device_names_the_trainer_can_use_are_accepted(device):
    assert RunConfig(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU"])
def test_other_device_names_are_refused_naming_the_field(device):
    with pytest.raises(ValidationError) as info:
        RunConfig(device=device)
    assert [e["loc"] for e in info.value.errors()] == [("device",)]


@pytest.mark.parametrize(
    "batch, field",
    [
        ({"prompts_per_step": 10**20}, "prompts_per_step"),  # would build 10**20 problems first
        ({"prompts_per_step": 1024, "samples_per_prompt": 128}, "samples_per_prompt"),
        ({"prompts_per_step": 65536}, "samples_per_prompt"),  # with the default 4 samples each
    ],
)
def test_more_rollouts_a_step_than_one_batch_can_hold_are_refused(batch, field):
    with pytest.raises(ValidationError) as info:
        RunConfig(**batch)
    assert [e["loc"] for e in info.value.errors()] == [(field,)]
    assert RunConfig(prompts_per_step=16384, samples_per_prompt=4).samples_per_prompt == 4


@pytest.mark.parametrize(
    "field, value", [("lr", float("inf")), ("lr", float("nan")), ("weight_decay", float("inf"))]
)
def test_a_step_size_that_is_not_a_finite_number_is_refused(field, value):
    """An infinite learning rate or decay would turn every weight into nan at the first step."""
    with pytest.raises(ValidationError) as info:
        RunConfig(**{field: value})
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ValidationError, match="give one of them"):
        RunConfig(resume=True, overwrite=True)


def test_the_student_folder_is_kept_absolute_so_a_resume_works_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(student="models/tiny-student")
    assert cfg.student == str(tmp_path / "models" / "tiny-student")
    assert RunConfig.model_validate_json(cfg.model_dump_json()).student == cfg.student


def test_a_tilde_in_out_is_expanded_not_made_a_folder_named_tilde(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert RunConfig(out="~/runs/a").out == str(tmp_path / "runs" / "a")


def test_a_schedule_a_user_gives_as_truncated_one_point_zero_is_refused_as_ambiguous():
    with pytest.raises(ValidationError, match="schedule\n.*write full for the whole horizon"):
        RunConfig(schedule="truncated:1.0")


def test_an_out_inside_a_symlink_loop_is_refused_naming_out(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ValidationError, match="out\n.*not a usable path"):
        RunConfig(out=str(tmp_path / "loop" / "run"))


@pytest.mark.parametrize(
    "given, ignored",
    [
        (dict(top_k=50), ["top_k"]),  # reverse_kl asks the teacher for no top-k
        (dict(loss="jsd_topk", gamma=0.5, adv_clip=1.0, top_k=4), ["adv_clip", "gamma"]),
        (dict(loss="forward_kl_topk", jsd_beta=0.3), ["jsd_beta"]),
        (dict(loss="jsd_topk", jsd_beta=0.3), []),
        (dict(), []),  # defaults are never a mistake
    ],
)
def test_settings_the_loss_ignores_are_named(given, ignored):
    assert RunConfig(**given).ignored_settings() == ignored


@pytest.mark.parametrize(
    "field", ["lr", "weight_decay", "grad_clip", "gamma", "adv_clip", "cut_at_error"]
)
def test_a_boolean_is_not_a_number_of_a_setting(field):
    """`cut_at_error: true` in a config file reads like a switch; pydantic alone would take it as 1."""
    with pytest.raises(ValidationError) as info:
        RunConfig(**{field: True})
    assert [e["loc"] for e in info.value.errors()] == [(field,)]
    assert "not a boolean" in str(info.value)
    assert RunConfig(lr="3e-4").lr == 3e-4  # YAML reads 3e-4 as a string


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_outside_32_bits_is_refused_before_sampling_would_overflow(seed):
    with pytest.raises(ValidationError) as info:
        RunConfig(seed=seed)
    assert [e["loc"] for e in info.value.errors()] == [("seed",)]


def test_the_api_schema_shows_the_device_pattern_the_validator_checks():
    pattern = RunConfig.model_json_schema()["properties"]["device"]["pattern"]
    for name in ["cpu", "cuda", "cuda:1", "gpu", "cuda:", "CPU"]:
        try:
            RunConfig(device=name)
            accepted = True
        except ValidationError:
            accepted = False
        assert bool(re.fullmatch(pattern, name)) == accepted, name


def test_the_api_schema_words_every_bound_in_json_schema_keywords():
    properties = RunConfig.model_json_schema()["properties"]
    assert not schema_keys(properties) & {"gt", "ge", "lt", "le"}
    assert properties["adv_clip"]["anyOf"][0]["exclusiveMinimum"] == 0
