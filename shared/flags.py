"""Command-line flags generated from a pydantic model's fields, so no CLI re-declares its settings:
one `--field-name` per field, typed by its annotation, with the field's description as help. Every
default is None, so only the flags given override the config (file, environment, model default)."""

from __future__ import annotations

import argparse
import typing

from pydantic import BaseModel


def add_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], env_prefix: str | None = None
) -> None:
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        if hasattr(default, "get_secret_value"):
            default = "(secret)"
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
        else:
            parser.add_argument(flag, default=None, help=help_text)


def given(args: argparse.Namespace, model: type[BaseModel]) -> dict:
    """The flags of `model`'s fields that were given on the command line."""
    return {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}
