"""Errors of the teacher protocol, shared by the server (which raises them) and the client (which
re-raises what the server said). One table maps each type to its HTTP status, both ways.

Every error travels in one shape, OpenAI-style:
    {"error": {"message": str, "type": str, "param": str | null, "code": int}}
"""

from __future__ import annotations


class TeacherError(Exception):
    """Base class; `param` names the offending field when there is one."""

    type = "teacher_error"

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        # A subclass defined elsewhere (the client's TeacherUnreachable) has its base's status.
        return next(STATUS_OF[cls] for cls in type(self).__mro__ if cls in STATUS_OF)

    def to_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }


class MalformedBody(TeacherError):
    """The body is not valid JSON / msgpack, or a packed array has a bad byte length."""

    type = "malformed_body"


class InvalidRequest(TeacherError):
    """Well-formed, but a field breaks a rule (token id out of range, top_k too large, ...)."""

    type = "invalid_request"


class BadRequest(TeacherError):
    """Refused by a compatibility route (TRL, OpenAI): what it does not support, or a bad field.
    Those clients expect 400, as their own servers answer."""

    type = "invalid_request_error"


class Unauthorized(TeacherError):
    type = "unauthorized"


class NotFound(TeacherError):
    type = "not_found"


class MethodNotAllowed(TeacherError):
    type = "method_not_allowed"


class PayloadTooLarge(TeacherError):
    type = "payload_too_large"


class UnsupportedMediaType(TeacherError):
    type = "unsupported_media_type"


class QueueFull(TeacherError):
    """The server has more queued work than its limit; retry after `retry_after` seconds."""

    type = "queue_full"


class NotReady(TeacherError):
    """The model is still loading, or the server is shutting down."""

    type = "not_ready"


class ServerError(TeacherError):
    type = "server_error"


class FingerprintMismatch(TeacherError):
    """Client-side: the teacher's tokenizer differs from the student's, so its ids mean other text."""

    type = "fingerprint_mismatch"


STATUS_OF: dict[type[TeacherError], int] = {
    TeacherError: 500,
    MalformedBody: 400,
    BadRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    MethodNotAllowed: 405,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidRequest: 422,
    QueueFull: 429,
    ServerError: 500,
    NotReady: 503,
    FingerprintMismatch: 409,
}
# Raised by the client itself, never answered by a server: a 409 from a proxy is no fingerprint check.
ERROR_OF_STATUS: dict[int, type[TeacherError]] = {
    s: e for e, s in STATUS_OF.items() if e not in (TeacherError, BadRequest, FingerprintMismatch)
}


def body_of_status(status: int, message: str) -> dict:
    """The error shape for a status the web framework answers itself (404 no such route, 405 wrong
    method), which has no error type of its own here: the status stays as it was."""
    err = ERROR_OF_STATUS.get(status, TeacherError)(message)
    return {"error": {**err.to_body()["error"], "code": status}}


def error_from_body(status: int, body: dict | None, retry_after: float | None) -> TeacherError:
    """Rebuild the server's error from its status and body (client side)."""
    cls = ERROR_OF_STATUS.get(status, ServerError if status >= 500 else InvalidRequest)
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):  # JSON, but not the error shape (a proxy, another framework)
        said = f": {' '.join(str(body).split())[:200]}" if body else ""
        err = {"message": f"HTTP {status}{said}"}
    message = err.get("message") or f"HTTP {status}"
    return cls(str(message), param=err.get("param"), retry_after=retry_after)


def field_message(error: dict) -> str:
    """The message of one pydantic error, without the "Value error, " prefix pydantic puts before
    what a validator raised: the message itself says what is wrong."""
    return error["msg"].removeprefix("Value error, ")


def from_validation(errors: list[dict], cls: type[TeacherError] | None = None) -> TeacherError:
    """One error (`cls`, default InvalidRequest) from pydantic's error list: `param` names the first
    failing field, and the message says what is wrong with up to three. FastAPI's leading "body"
    is dropped from each location, so a field reads the same whichever way it was validated."""

    def where(error: dict) -> str:
        # A union's member shows in the location under its type ("list[int]"): no field's name.
        parts = error["loc"]
        return ".".join(
            str(p) for p in parts if p != "body" and not (isinstance(p, str) and "[" in p)
        )

    parts = [f"{where(e) or 'body'}: {field_message(e)}" for e in errors[:3]]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return (cls or InvalidRequest)("; ".join(parts) + more, param=where(errors[0]) or None)
