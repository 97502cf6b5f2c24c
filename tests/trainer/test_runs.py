"""The trainer server's registry of runs, without HTTP."""

from __future__ import annotations

import asyncio

import pytest

from services.trainer.config import RunConfig
from services.trainer.runs import Runs, TrainerMetrics
from shared.errors import NotReady


def test_no_run_starts_once_the_server_is_shutting_down(tmp_path):
    """A POST /runs answered after the shutdown signal would start a run that nobody stops."""
    loop = asyncio.new_event_loop()
    try:
        runs = Runs(loop, TrainerMetrics())
        runs.stop_each()
        with pytest.raises(NotReady, match="shutting down"):
            runs.start(RunConfig(out=str(tmp_path / "run")))
        assert runs.records == {}
    finally:
        loop.close()
