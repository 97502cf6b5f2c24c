"""The handlers both apps share: every error in the one shape (our own, and the framework's 404 and
405 with its Allow header), and Prometheus text with its content type."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter

from shared.errors import MethodNotAllowed, QueueFull
from shared.web import install_error_shape, metrics_response
from tests.conftest import serve


def tiny_app() -> FastAPI:
    app = FastAPI()
    install_error_shape(app)
    registry = CollectorRegistry()
    Counter("hits", "Hits", registry=registry).inc()

    @app.get("/busy")
    async def busy():
        raise QueueFull("queue full", retry_after=2.0)

    @app.get("/metrics")
    async def metrics():
        return metrics_response(registry)

    return app


def test_errors_have_one_shape_with_their_headers():
    with serve(tiny_app(), ready_path="/metrics") as url:
        busy = httpx.get(url + "/busy")
        assert busy.status_code == 429 and busy.headers["retry-after"] == "2"
        assert busy.json()["error"] == {
            "message": "queue full",
            "type": QueueFull.type,
            "param": None,
            "code": 429,
        }
        missing = httpx.get(url + "/nowhere")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
        wrong = httpx.post(url + "/busy")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
        assert wrong.json()["error"]["code"] == 405
        assert wrong.json()["error"]["type"] == MethodNotAllowed.type
        scraped = httpx.get(url + "/metrics")
        assert scraped.headers["content-type"].startswith("text/plain; version=")
        assert "hits_total 1.0" in scraped.text
