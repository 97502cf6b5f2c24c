"""Where the bundled models live, and the device names this project accepts: constants that the CLIs
and settings need before (or without) importing torch, which takes seconds."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEACHER_PATH = REPO_ROOT / "models" / "tiny-teacher"
STUDENT_PATH = REPO_ROOT / "models" / "tiny-student"
# Where a model may be placed: torch device names this project supports (a config field pattern).
DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]+)?)$"
