import argparse

import pytest
from pydantic import BaseModel, Field, ValidationError

from shared.flags import Parser, add_flags, field_errors, field_words

FIELDS = ("out", "resume", "max_new_tokens", "top_k", "api_key")


@pytest.mark.parametrize(
    "cli, api",
    [
        (
            "--out runs/a holds a run: --resume to continue it",
            "out runs/a holds a run: resume to continue it",
        ),
        ("--max-new-tokens 600 and --top-k 8", "max_new_tokens 600 and top_k 8"),
        ("(the teacher's key goes in --api-key)", "(the teacher's key goes in api_key)"),
        # Not fields: another flag, a path, a URL, a quoted value, a bare "--", a negative number.
        ("--no-progress hides the bar", "--no-progress hides the bar"),
        ("/tmp/a--b and /data/--resume are missing", "/tmp/a--b and /data/--resume are missing"),
        ("http://h/x?--top-k=1 and x=--out", "http://h/x?--top-k=1 and x=--out"),
        ("schedule '--resume' is unknown", "schedule '--resume' is unknown"),
        ("use -- to end options; step --3", "use -- to end options; step --3"),
    ],
)
def test_field_words_names_each_flag_of_a_field_by_the_field(cli, api):
    assert field_words(cli, FIELDS) == api


class Settings(BaseModel):
    max_new_tokens: int = Field(256, gt=0)


def test_a_flag_and_its_error_use_the_dashed_name_that_field_words_undoes():
    parser = argparse.ArgumentParser()
    add_flags(parser, Settings)
    assert parser.parse_args(["--max-new-tokens", "5"]).max_new_tokens == 5
    with pytest.raises(ValidationError) as exc:
        Settings(max_new_tokens=0)
    (line,) = field_errors(exc.value)
    assert line.startswith("--max-new-tokens: ")
    assert field_words(line, Settings.model_fields).startswith("max_new_tokens: ")


class TwoSettings(Settings):
    top_k: int = Field(8, description="Teacher top-k.")
    names: list[str] = Field(default_factory=list)


def test_only_the_named_fields_get_flags_with_their_defaults_in_the_help():
    parser = argparse.ArgumentParser()
    add_flags(parser, TwoSettings, only=["top_k"])
    assert "--top-k" in parser.format_help() and "[default 8]" in parser.format_help()
    assert "--max-new-tokens" not in parser.format_help()
    assert parser.parse_args([]).top_k is None  # not given: the model's default applies


def test_a_commands_own_default_is_the_one_its_help_shows():
    parser = argparse.ArgumentParser()
    add_flags(parser, TwoSettings, only=["top_k"], defaults={"top_k": 4})
    assert "[default 4]" in parser.format_help() and "[default 8]" not in parser.format_help()
    assert parser.parse_args([]).top_k is None  # the command applies its own default


def test_a_default_made_by_a_factory_is_shown_as_its_value():
    parser = argparse.ArgumentParser()
    add_flags(parser, TwoSettings, only=["names"])
    assert "[default (none)]" in parser.format_help() and "Undefined" not in parser.format_help()


def test_a_list_default_is_shown_as_it_is_typed():
    class Urls(BaseModel):
        url: list[str] = ["http://a:1", "http://b:2"]

    parser = argparse.ArgumentParser()
    add_flags(parser, Urls)
    assert "[default http://a:1 http://b:2]" in " ".join(parser.format_help().split())


@pytest.mark.parametrize("value", ["-1e-4", "-3", "-.5", "-2.5E+3"])
def test_a_negative_number_is_a_flags_value_for_its_own_check_to_refuse(value):
    """Python 3.10-3.12's argparse takes -1e-4 for a flag ("expected one argument")."""
    parser = Parser(prog="p")
    parser.add_argument("--lr", type=float)
    sub = parser.add_subparsers(dest="command").add_parser("run")
    sub.add_argument("--lr", type=float)
    assert parser.parse_args(["--lr", value]).lr == float(value)
    assert parser.parse_args(["run", "--lr", value]).lr == float(value)


def test_a_flag_is_still_no_value():
    parser = Parser(prog="p", exit_on_error=False)
    parser.add_argument("--lr", type=float)
    parser.add_argument("-x", action="store_true")
    with pytest.raises(argparse.ArgumentError, match="expected one argument"):
        parser.parse_args(["--lr", "-x"])
