"""Where the bundled models live, and the device names this project accepts: constants that the CLIs
and settings need before (or without) importing torch, which takes seconds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

REPO_ROOT = Path(__file__).resolve().parent.parent
TEACHER_PATH = REPO_ROOT / "models" / "tiny-teacher"
STUDENT_PATH = REPO_ROOT / "models" / "tiny-student"


DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]+)?)$"


def _device_name(value: str) -> str:
    if not re.fullmatch(DEVICE_PATTERN, value):
        raise ValueError(f"{value!r} is not a device name: use cpu, cuda or cuda:N")
    return value


# Where a model may be placed: the torch device names this project supports (a config field type).
# The pattern is checked by the validator, for its message, and shown in the API's schema.
DeviceName = Annotated[
    str, AfterValidator(_device_name), WithJsonSchema({"type": "string", "pattern": DEVICE_PATTERN})
]
