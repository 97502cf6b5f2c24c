"""What the teacher's and the trainer's FastAPI apps share: answers in the one error shape, for our
own errors, for those the framework raises itself (no such route, wrong method) and for bugs, and the
Prometheus exposition."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ServerError, TeacherError, body_of_status

log = logging.getLogger("opd.web")


def _package_version() -> str:
    try:
        return version("opd-teacher-service")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


# The installed package's version: both apps' OpenAPI version, and the teacher's /info.
VERSION = _package_version()


def media_type(request: Request, default: str = "") -> str:
    """The request's Content-Type without its parameters (`; charset=...`), lower-cased."""
    return request.headers.get("content-type", default).split(";")[0].strip().lower()


def error_response(err: TeacherError) -> JSONResponse:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(int(round(err.retry_after)))
    return JSONResponse(err.to_body(), status_code=err.status, headers=headers)


def install_error_shape(app: FastAPI) -> None:
    """Answer TeacherError, the framework's own HTTP errors (404, 405) and any other exception (a
    500, its traceback logged) in the error shape."""

    @app.exception_handler(TeacherError)
    async def teacher_error(request: Request, exc: TeacherError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            body_of_status(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=exc.headers,  # a 405's Allow
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(ServerError(f"internal error ({type(exc).__name__})"))


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
