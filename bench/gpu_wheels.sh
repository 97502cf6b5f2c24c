#!/usr/bin/env bash
# Fetch, into .gpu/wheels (git-ignored), the wheels a lent GPU machine lacks to run this project's
# services and tests: its image has torch, transformers, httpx, msgpack, h11, pyyaml and pytest, but
# no pydantic, FastAPI or uvicorn. The versions are this virtualenv's; the machine's Python is 3.12.
# The gpu_*.sh scripts install them first; name .gpu in the device tool's `carry`.
#   bash bench/gpu_wheels.sh        # about 4 MB
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || git check-ignore -q .gpu || echo '/.gpu/' >> .git/info/exclude
pins=$("$py" - <<'PY'
import importlib.metadata as m
names = ["pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "annotated-types",
         "typing-inspection", "fastapi", "starlette", "uvicorn", "opentelemetry-api"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PY
)
# shellcheck disable=SC2086
"$py" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels $pins
ls .gpu/wheels
