"""What the teacher's and the trainer's FastAPI apps share: answers in the one error shape, for our
own errors and for those the framework raises itself (no such route, wrong method), and the
Prometheus exposition."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import TeacherError, body_of_status


def error_response(err: TeacherError) -> JSONResponse:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(int(round(err.retry_after)))
    return JSONResponse(err.to_body(), status_code=err.status, headers=headers)


def install_error_shape(app: FastAPI) -> None:
    """Answer TeacherError and the framework's own HTTP errors (404, 405) in the error shape."""

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


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
