"""Command-line flags generated from a pydantic model's fields, so no CLI re-declares its settings:
one `--field-name` per field, typed by its annotation, with the field's description as help. Every
default is None, so only the flags given override the config (file, environment, model default)."""

from __future__ import annotations

import argparse
import errno
import re
import socket
import typing
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ValidationError

from shared.errors import field_message

# A `--flag-name` in a message, not inside a word, path, URL or quoted value (`a--b`, `/--x`, `'--x'`).
_FLAG = re.compile(r"(?<![\w/=?'\"-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


class Parser(argparse.ArgumentParser):
    """argparse's parser, reading `--lr -1e-4` as the flag and its value, as Python 3.13 does:
    3.10-3.12 take a number in e-notation for a flag and say only "expected one argument", where
    the value's own check says what is wrong with it. Its subcommands' parsers are Parsers too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")


def field_words(message: str, fields: Iterable[str]) -> str:
    """A message written for the command line, reworded for an API user who sent the same settings
    as JSON: each `--flag-name` of one of `fields` becomes the field's name, `flag_name`."""
    names = set(fields)

    def reworded(match: re.Match) -> str:
        name = match.group(1).replace("-", "_")
        return name if name in names else match.group(0)

    return _FLAG.sub(reworded, message)


def add_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    env_prefix: str | None = None,
    only: Iterable[str] | None = None,
    defaults: dict | None = None,
) -> None:
    """A flag for each of `model`'s fields, or for the fields named in `only`; `defaults` are the
    values the command uses where they differ from the model's, for the help."""
    fields = model.model_fields
    for name in fields if only is None else only:
        field = fields[name]
        flag = "--" + name.replace("_", "-")
        default = (defaults or {}).get(name, field.get_default(call_default_factory=True))
        if hasattr(default, "get_secret_value"):
            default = "(secret)"
        elif isinstance(default, list):  # as it is typed: --flag A B
            default = " ".join(map(str, default)) or "(none)"
        elif default is None:  # not a value the flag takes
            default = "unset"
        env = f"env {env_prefix}{name.upper()}; " if env_prefix else ""
        help_text = f"{field.description or ''} [{env}default {default}]"
        origin = typing.get_origin(field.annotation)
        if field.annotation is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif origin is list:
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        elif origin is typing.Literal:
            choices = typing.get_args(field.annotation)
            parser.add_argument(flag, choices=choices, default=None, help=help_text)
        elif _is_int(field.annotation):  # an int, so a model may refuse "2" and true from files
            parser.add_argument(flag, type=int, default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)


def _is_int(annotation) -> bool:
    """int or int | None."""
    return annotation is int or set(typing.get_args(annotation)) == {int, type(None)}


def given(
    args: argparse.Namespace, model: type[BaseModel], only: Iterable[str] | None = None
) -> dict:
    """The flags of `model`'s fields (or of those named in `only`) given on the command line."""
    names = model.model_fields if only is None else set(only)
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# Caps that make a huge number a usage error, not an overflow deep inside or hours of setup.
MAX_THREADS = 1024  # more than any machine's cores (torch.set_num_threads overflows past 2**63)
MAX_PROBLEMS = 100_000  # per evaluation: seconds to draw, hours to evaluate on a CPU
MAX_SAMPLES = 1024  # of avg@k, per problem
MAX_COUNT = 2**31 - 1  # any other count


def positive_int(text: str, most: int = MAX_COUNT) -> int:
    """argparse type: an integer from 1 to `most`, else a usage error that names the flag."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return _at_most(value, most)


def _at_most(value: int, most: int) -> int:
    if value > most:
        raise argparse.ArgumentTypeError(f"{value} is more than {most}")
    return value


def thread_count(text: str) -> int:
    """argparse type: torch CPU threads, 1 to MAX_THREADS."""
    return positive_int(text, MAX_THREADS)


def problem_count(text: str) -> int:
    """argparse type: how many problems, 1 to MAX_PROBLEMS."""
    return positive_int(text, MAX_PROBLEMS)


def sample_count(text: str) -> int:
    """argparse type: samples per problem, 1 to MAX_SAMPLES."""
    return positive_int(text, MAX_SAMPLES)


def non_negative_int(text: str) -> int:
    """argparse type: an integer from 0 (where 0 means "off") to MAX_COUNT."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return _at_most(value, MAX_COUNT)


# numpy's generators take no larger seed; the trainer's configs hold seeds to the same range.
MAX_SEED = 2**32 - 1


def seed(text: str) -> int:
    """argparse type: a seed from 0 to MAX_SEED."""
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is not a seed (0 to {MAX_SEED})")
    return value


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def cannot_listen(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port, naming the flag to change (--port when the port
    is in use or not ours to take, --host when the address is not this machine's), or None;
    checked before the server starts, so the user gets one line instead of the server's log.
    Probes the way uvicorn binds: IPv6 for a host with a colon, else IPv4, with SO_REUSEADDR."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            flag = "--port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
            return f"{flag} cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


# uvicorn and socket.bind take "" for every address, so an unset `--host "$HOST"` would open a
# server to every network it reaches.
EMPTY_HOST = "an empty host would listen on every address: give 0.0.0.0 to mean that"


def listen_host(text: str) -> str:
    """argparse type: an address to listen on, not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError(EMPTY_HOST)
    return text


def out_folder(text: str) -> str:
    """argparse type: a folder to write into, not empty: an unset `--out "$OUT"` would write into
    the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name: give . for the current directory")
    return text


def port_number(text: str) -> int:
    """argparse type: a TCP port."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def field_errors(
    exc: ValidationError, env_prefix: str | None = None, files: Mapping[str, str] | None = None
) -> list[str]:
    """One line per bad setting, named where the user wrote it: `FILE: key` for a key read from a
    file (`files` maps such keys to their file), else `--flag` (with its environment variable,
    where the settings read one)."""
    files = files or {}
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        key = loc[0] if loc else ""
        if key in files:
            where = f"{files[key]}: {'.'.join(loc)}"
        else:
            where = "--" + key.replace("_", "-") + "".join(f"[{p}]" for p in loc[1:])
            if env_prefix:
                where += f" (or env {env_prefix}{key.upper()})"
        message = field_message(err)
        if err["type"] == "extra_forbidden":
            message = "not a setting" + (
                f" (keys are written with underscores: {key.replace('-', '_')})"
                if "-" in key
                else ""
            )
        lines.append(f"{where}: {message}")
    return lines
