"""The error shape: every type keeps its status both ways, and pydantic's errors become one error
that names the first bad field."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from shared.errors import (
    STATUS_OF,
    BadRequest,
    FingerprintMismatch,
    InvalidRequest,
    NotReady,
    ServerError,
    TeacherError,
    error_from_body,
    from_validation,
)

SERVER_ANSWERS = [c for c in STATUS_OF if c not in (TeacherError, BadRequest, FingerprintMismatch)]


@pytest.mark.parametrize("cls", SERVER_ANSWERS)
def test_an_error_survives_the_wire(cls):
    err = cls("what went wrong", param="field", retry_after=2.0)
    back = error_from_body(err.status, err.to_body(), retry_after=2.0)
    assert type(back) is cls and back.to_body() == err.to_body() and back.retry_after == 2.0


def test_a_status_the_table_lacks_still_gives_a_useful_type():
    assert type(error_from_body(502, None, None)) is ServerError
    assert type(error_from_body(418, {}, None)) is InvalidRequest
    assert str(error_from_body(503, None, 1.0)) == "HTTP 503" and NotReady in STATUS_OF


@pytest.mark.parametrize("body", [{"error": "boom"}, ["a", "list"], {"detail": "no"}, "text"])
def test_a_json_body_that_is_not_the_error_shape_is_kept_in_the_message(body):
    err = error_from_body(502, body, None)
    assert type(err) is ServerError and err.message.startswith("HTTP 502: ")
    assert str(body if not isinstance(body, dict) else list(body.values())[0])[:2] in err.message


def test_a_409_from_a_proxy_is_no_fingerprint_check_and_subclasses_keep_their_status():
    assert type(error_from_body(409, None, None)) is InvalidRequest

    class Unreachable(ServerError):  # as the client's TeacherUnreachable
        pass

    assert Unreachable("gone").status == 500


class Settings(BaseModel):
    top_k: int
    name: str

    @field_validator("name")
    @classmethod
    def _plain(cls, value: str) -> str:
        if not value.isalpha():
            raise ValueError("letters only")
        return value


def validation_errors(data: dict) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        Settings.model_validate(data)
    return info.value.errors(include_url=False)


def test_from_validation_names_the_first_field_and_drops_pydantics_prefix():
    err = from_validation(validation_errors({"top_k": "many", "name": "a1"}))
    assert type(err) is InvalidRequest and err.param == "top_k"
    assert err.message.startswith("top_k: Input should be a valid integer")
    assert "name: letters only" in err.message and "Value error" not in err.message


def test_from_validation_reads_fastapis_body_locations_and_takes_a_type():
    errors = [{**e, "loc": ("body", *e["loc"])} for e in validation_errors({"name": "ok"})]
    err = from_validation(errors, BadRequest)
    assert type(err) is BadRequest and err.param == "top_k" and err.status == 400


def test_from_validation_says_how_many_more_it_left_out():
    errors = validation_errors({"top_k": "x", "name": "1"}) * 3
    assert from_validation(errors).message.endswith("(and 3 more)")
