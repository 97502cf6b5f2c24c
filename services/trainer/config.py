"""One serialisable run config: the CLI, config files (YAML/TOML) and the HTTP API all build it, and
a bad value is refused with the field named."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from opd.bundled import STUDENT_PATH, DeviceName
from services.trainer.schedules import ScheduleError, parse_schedule, refuse_ambiguous
from shared.client import checked_api_key, checked_url
from shared.flags import MAX_PROBLEMS, MAX_SAMPLES, MAX_SEED, MAX_THREADS, field_words
from shared.task import MAX_NEW_TOKENS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# The variable the teacher reads its key from: `opd-trainer run` and `opd demo` send the key in it when
# given none, so one variable configures both ends (compose sets it for both). The control API does
# not: a caller could name a teacher_url of its own and be sent the server's key.
API_KEY_ENV = "OPD_TEACHER_API_KEY"


def api_key_from_env() -> str | None:
    """The key in API_KEY_ENV (empty, as compose passes an unset variable: none); ValueError
    naming the variable for a key no header can carry."""
    key = os.environ.get(API_KEY_ENV) or None
    if key is not None:
        try:
            checked_api_key(key)
        except ValueError as exc:
            raise ValueError(f"env {API_KEY_ENV}: {exc}") from None
    return key


# A step's rollouts decode as one batch: 65,536 is 16 times the largest measured (1,024 x 4 on an H200).
MAX_ROLLOUTS_PER_STEP = 65536

# The run settings `opd demo` takes, as `opd-trainer run` does, the same for every run: where the
# student runs (and the teacher the demo starts), the batch, the step size, the loss, the streams to
# a balanced teacher pool, and avg@k at the end.
DEMO_RUN_SETTINGS = (
    "device",
    "prompts_per_step",
    "samples_per_prompt",
    "micro_batch",
    "lr",
    "loss",
    "top_k",
    "streams_per_url",
    "eval_samples",
)
# Those the demo sets unless its flags do: the bundled student gains from the teacher's top-k at
# every position of its rollouts within the demo's steps, and needs about four times as many with
# the trainer's default loss, reverse_kl (bench/results/FINDINGS.md, the last section).
DEMO_DEFAULTS = {"loss": "forward_kl_topk"}


def _not_a_bool(value: Any) -> Any:
    # pydantic reads true as 1.0; in a config file `cut_at_error: true` reads like a switch, not 1 nat.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


# A decimal setting: a number, or a string of one (flags and YAML's `3e-4` arrive as strings).
Real = Annotated[float, BeforeValidator(_not_a_bool), Field(allow_inf_nan=False)]
# For `X | None` the bound must sit on the number, before the validator wraps it: else the API
# schema shows an unknown "gt" keyword instead of exclusiveMinimum.
PositiveReal = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_not_a_bool)]

# Runs a control API server trains at once unless told otherwise (`opd-trainer serve --max-runs`):
# each holds a student, its optimizer and its rollouts in the one process.
MAX_RUNS = 4


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    student: str = Field(
        str(STUDENT_PATH), description="Local folder of the student (HF causal LM)."
    )
    teacher_url: list[str] = Field(
        ["http://127.0.0.1:8000"], min_length=1, description="Teacher base URL(s)."
    )
    max_new_tokens: int = Field(
        MAX_NEW_TOKENS,
        ge=1,
        # Evaluation generates this far (the task's longest solution fits): rollouts never longer.
        le=MAX_NEW_TOKENS,
        description=f"H_max: the full horizon, at most {MAX_NEW_TOKENS} (what evaluation generates).",
        strict=True,
    )
    schedule: str = Field(
        "full",
        description="Horizon: full | truncated:R (R < 1: that fraction of H_max, else R tokens) | "
        "progressive:h0=A,dh=B,every=C | linear:h0=A,steps=C",
    )
    steps: int = Field(100, ge=1, description="Optimizer steps.", strict=True)
    out: str = Field(
        "runs/opd", min_length=1, description="Output folder (metrics, plots, checkpoints)."
    )
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="Seed of the training problems' order, the held-out set and sampling.",
        strict=True,
    )
    prompts_per_step: int = Field(
        16, ge=1, le=MAX_ROLLOUTS_PER_STEP, description="Problems per step.", strict=True
    )
    samples_per_prompt: int = Field(
        4,
        ge=1,
        description=f"Rollouts per problem (G); at most {MAX_ROLLOUTS_PER_STEP} rollouts a step.",
        strict=True,
        validate_default=True,  # the product is checked when only --prompts-per-step is given
    )
    lr: Real = Field(1e-4, gt=0, description="AdamW learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warmup.", strict=True)
    weight_decay: Real = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: Real = Field(1.0, gt=0, description="Gradient-norm clip.")
    loss: Literal["reverse_kl", "forward_kl_topk", "jsd_topk"] = Field(
        "reverse_kl",
        description="reverse_kl: policy gradient on A_t; *_topk use the teacher's top-k.",
    )
    top_k: int = Field(8, ge=1, description="Teacher top-k for the *_topk losses.", strict=True)
    jsd_beta: Real = Field(0.5, gt=0, lt=1, description="beta of JSD(beta).")
    gamma: Real = Field(
        0.0, ge=0, le=1, description="Discount of future advantages (0: per token)."
    )
    adv_clip: PositiveReal | None = Field(
        None, description="Clip |A_t| to this (unset: no clipping)."
    )
    cut_at_error: PositiveReal | None = Field(
        None,
        description="Train each rollout only up to its first error: a token the teacher gives at "
        "least this many nats less than the student (off by default; 2 is a good start).",
    )
    dropout: bool = Field(
        False,
        description="Keep the student's dropout in its training passes (off by default, as TRL's "
        "disable_dropout: the advantage, the importance ratio and --cut-at-error compare the "
        "training pass's log-probs with those the rollout was sampled at).",
        strict=True,
    )
    micro_batch: int = Field(
        16, ge=1, description="Rollouts per frame streamed to the teacher.", strict=True
    )
    eval_every: int = Field(
        20, ge=0, description="Evaluate every N steps (0: only at step 0 and the end).", strict=True
    )
    eval_n: int = Field(
        200, ge=1, le=MAX_PROBLEMS, description="Held-out problems per evaluation.", strict=True
    )
    eval_samples: int = Field(
        0,
        ge=0,
        le=MAX_SAMPLES,
        description="k of avg@k at the final evaluation (0: off).",
        strict=True,
    )
    checkpoint_every: int = Field(
        0,
        ge=0,
        description="Checkpoint every N steps (0: only at the end).",
        strict=True,
    )
    resume: bool = Field(
        False,
        description="Continue from the last checkpoint in --out (opd-trainer run takes the settings "
        "not given from its config.json).",
        strict=True,
    )
    overwrite: bool = Field(
        False,
        description="Start over in an --out that holds a run (its checkpoints and summary are deleted).",
        strict=True,
    )
    device: DeviceName = Field(
        "cpu", description="Where the student trains and samples: cpu, cuda or cuda:N."
    )
    threads: int | None = Field(
        None, ge=1, le=MAX_THREADS, description="torch CPU threads.", strict=True
    )
    teacher_load_wait_s: Real = Field(
        600.0,
        ge=0,
        description="Seconds a run waits at its start for teacher replicas still loading their model.",
    )
    streams_per_url: int = Field(
        1,
        ge=1,
        le=64,
        description="Scoring streams a step opens to each --teacher-url: behind a load balancer, "
        "its number of replicas (the balancer keeps a stream on one replica).",
        strict=True,
    )
    teacher_timeout_s: PositiveReal = Field(
        120.0,
        description="Seconds to wait for a teacher's answer (a score on a stream, or a whole "
        "request) before giving up on it; raise it for a teacher that is this slow.",
    )
    api_key: str | None = Field(
        None,
        description=f"Teacher API key, if it needs one (opd-trainer run and opd demo read "
        f"{API_KEY_ENV} when it is not given; the control API does not).",
    )
    progress: bool = Field(True, description="Show a progress bar.", strict=True)

    def ignored_settings(self) -> list[str]:
        """Settings given (not defaulted) that the chosen --loss does not use: a likely mistake."""
        uses = {
            "reverse_kl": {"gamma", "adv_clip"},
            "forward_kl_topk": {"top_k"},
            "jsd_topk": {"top_k", "jsd_beta"},
        }[self.loss]
        unused = {"gamma", "adv_clip", "top_k", "jsd_beta"} - uses
        return sorted(f for f in self.model_fields_set & unused)

    @property
    def teacher_top_k(self) -> int:
        """The top-k to ask the teacher for: only the *_topk losses use one."""
        return 0 if self.loss == "reverse_kl" else self.top_k

    @field_validator("schedule")
    @classmethod
    def _schedule_parses(cls, value: str, info: ValidationInfo) -> str:
        # Checked against this run's H_max; when that is itself bad, only the spec's form.
        h_max = info.data.get("max_new_tokens", math.inf)
        try:
            parse_schedule(value, h_max)
            refuse_ambiguous(value)
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("samples_per_prompt")
    @classmethod
    def _one_batch_of_rollouts(cls, samples: int, info: ValidationInfo) -> int:
        rollouts = samples * info.data.get("prompts_per_step", 1)
        if rollouts > MAX_ROLLOUTS_PER_STEP:
            raise ValueError(
                f"--prompts-per-step x --samples-per-prompt is {rollouts} rollouts a step; at most "
                f"{MAX_ROLLOUTS_PER_STEP}, since a step's rollouts decode as one batch"
            )
        return samples

    @field_validator("student")
    @classmethod
    def _absolute(cls, value: str) -> str:
        # As an absolute path, the run's saved config.json resumes from any working directory.
        return str(usable_path(value).absolute()) if value else value

    @field_validator("out")
    @classmethod
    def _a_path(cls, value: str) -> str:
        usable_path(value)
        return run_folder(value)

    @field_validator("api_key")
    @classmethod
    def _fits_a_header(cls, value: str | None) -> str | None:
        return checked_api_key(value) if value else value

    @field_validator("overwrite")
    @classmethod
    def _not_both(cls, overwrite: bool, info: ValidationInfo) -> bool:
        if overwrite and info.data.get("resume"):
            raise ValueError("--overwrite starts over and --resume continues: give one of them")
        return overwrite

    @field_validator("teacher_url", mode="before")
    @classmethod
    def _one_url_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("teacher_url")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        return [checked_url(url) for url in urls]


def run_folder(out: str) -> str:
    """Where a run given `out` writes: ~ expanded (Path(out) would take "~" for a folder's name),
    the rest as the user wrote it. Whatever looks for the run (--resume reading its config.json,
    the demo checking its folders) must look there too: "--out=~/runs", which a shell leaves as
    it is, once let the demo check ./~/runs and replace a user's runs in $HOME/runs."""
    return os.path.expanduser(out)


def usable_path(value: str) -> Path:
    """`value` as a path (with ~ expanded) that this machine can look up, or a ValueError that
    says why not: a NUL character, an unknown ~user or a name too long would otherwise fail deep
    inside the run."""
    if "\0" in value:
        raise ValueError("a path cannot hold a NUL character")
    try:
        path = Path(value).expanduser()
    except RuntimeError as exc:  # ~user for a user this machine does not know
        raise ValueError(f"cannot expand ~ in {value} ({exc})") from None
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        pass  # not there yet (a run makes it), or under a file (the run says so, naming --out)
    except OSError as exc:  # a name too long, a symlink loop, a folder it may not search
        raise ValueError(f"not a usable path ({exc.strerror or exc})") from None
    return path


def in_api_words(message: str) -> str:
    """A message that names run settings as the CLI's flags, reworded for a control-API client, who
    sent them as fields (`--max-new-tokens` becomes `max_new_tokens`)."""
    return field_words(message, RunConfig.model_fields)


class _UniqueKeys(yaml.SafeLoader):
    """safe_load, refusing a key given twice (PyYAML would keep the last, without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):  # settings are named; `1:`, `null:` or `[a, b]:` is not
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"a key must be a setting's name, not of type {type(key).__name__}",
                    key_node.start_mark,
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config_file(path: str | Path) -> dict:
    """Settings from a .yaml/.yml/.toml file (keys are RunConfig field names)."""
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"{path}: config files are .yaml, .yml or .toml")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"--config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.load(text, _UniqueKeys) or {}
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message in one line, without its '"<unicode string>"' and caret drawing."""
    if not (isinstance(exc, yaml.MarkedYAMLError) and exc.problem):
        return " ".join(str(exc).split())
    said = f"{exc.context}: {exc.problem}" if exc.context else exc.problem
    mark = exc.problem_mark
    return said + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")


def saved_settings(out: str | Path) -> dict:
    """The settings the run in `out` was started with (its config.json), which --resume continues
    from; {} when there is no run there."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    # The folder is where it was found now, not where it was made; settings this version no longer
    # has are dropped rather than refused, so an older run can still be continued.
    return {
        k: v
        for k, v in saved.items()
        if k in RunConfig.model_fields and k not in ("out", "resume", "overwrite")
    }
