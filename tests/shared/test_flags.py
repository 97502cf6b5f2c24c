import argparse

import pytest
from pydantic import BaseModel, Field, ValidationError

from shared.flags import add_flags, field_errors, field_words


@pytest.mark.parametrize(
    "cli, api",
    [
        (
            "--out runs/a holds a run: --resume to continue it",
            "out runs/a holds a run: resume to continue it",
        ),
        ("--max-new-tokens 600 and --top-k 8", "max_new_tokens 600 and top_k 8"),
        ("(the teacher's key goes in --api-key)", "(the teacher's key goes in api_key)"),
        # Not flags: a path with a double dash, a bare "--", a negative number.
        ("/tmp/a--b is missing", "/tmp/a--b is missing"),
        ("use -- to end options; lr -- 3", "use -- to end options; lr -- 3"),
        ("step --3", "step --3"),
    ],
)
def test_field_words_names_each_flag_by_its_field(cli, api):
    assert field_words(cli) == api


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
    assert field_words(line).startswith("max_new_tokens: ")
