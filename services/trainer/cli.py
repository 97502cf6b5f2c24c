"""`opd-trainer`: on-policy distillation runs, the trainer's control API, and comparison plots.

opd-trainer run --teacher-url http://127.0.0.1:8000 --schedule truncated:0.1 --steps 100 --out runs/topd
opd-trainer run --config run.yaml --steps 50          # flags override the file
opd-trainer run --out runs/topd --resume              # continue it, with its config.json's settings
opd-trainer serve --port 8100                         # POST /runs, GET /runs/{id}/events, ...
opd-trainer plot runs/full runs/topd --out compare.png
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from services.trainer.config import (
    MAX_RUNS,
    RunConfig,
    api_key_from_env,
    load_config_file,
    run_folder,
    saved_settings,
)
from shared.flags import (
    Parser,
    add_flags,
    cannot_listen,
    field_errors,
    given,
    listen_host,
    port_number,
    positive_int,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="opd-trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run on-policy distillation against a teacher server")
    run.add_argument("--config", help="YAML or TOML file of settings (flags override it)")
    add_flags(run, RunConfig)
    serve = sub.add_parser("serve", help="serve the HTTP control API (POST /runs ...)")
    serve.add_argument(
        "--host",
        type=listen_host,
        default="127.0.0.1",
        help="address to listen on [default %(default)s]",
    )
    serve.add_argument(
        "--port", type=port_number, default=8100, help="port to listen on [default %(default)s]"
    )
    serve.add_argument(
        "--max-runs",
        type=positive_int,
        default=MAX_RUNS,
        help="runs training at once; POST /runs beyond that is a 429 [default %(default)s]",
    )
    plot = sub.add_parser("plot", help="plot eval accuracy of runs side by side")
    plot.add_argument("runs", nargs="+", help="run folders (with eval.jsonl)")
    plot.add_argument("--out", required=True, type=png_path, help="PNG file to write")
    return parser


def png_path(text: str) -> Path:
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"{text}: the plot is written as PNG, so name a .png file")
    return Path(text)


class ConfigError(Exception):
    """Bad settings, one line each, named where the user wrote them (a flag or a config-file key)."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config from --config and the flags (flags win); with --resume, on top of the
    settings the run was started with (`out`/config.json), so it goes on as it began."""
    from_file = load_config_file(args.config) if args.config else {}
    flags = given(args, RunConfig)
    chosen = {**from_file, **flags}
    if "api_key" not in chosen:
        try:
            if key := api_key_from_env():
                chosen["api_key"] = key
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None
    out = chosen.setdefault("out", RunConfig.model_fields["out"].default)
    folder = run_folder(str(out))
    saved, saved_file = {}, Path(folder) / "config.json"
    if out and chosen.get("resume") is True:  # a bool: RunConfig refuses any other value
        saved = saved_settings(folder)
    try:
        cfg = RunConfig(**{**saved, **chosen})
    except ValidationError as exc:
        # Each bad setting named where it was written: a flag, the --config file, or the saved run.
        files = {k: str(saved_file) for k in saved.keys() - chosen.keys()}
        files |= {k: args.config for k in from_file.keys() - flags.keys()}
        raise ConfigError(field_errors(exc, files=files)) from None
    changed = [
        f"{k} {saved[k]} -> {v}"
        for k, v in cfg.model_dump().items()
        if k in saved and saved[k] != v and k not in _NOT_THE_RUNS_COURSE
    ]
    for name in (n for n in cfg.ignored_settings() if n in chosen):  # given now, not saved
        flag = "--" + name.replace("_", "-")
        print(f"opd-trainer: note: {flag} does nothing with --loss {cfg.loss}", file=sys.stderr)
    if changed:  # allowed (more steps, say), but the run no longer repeats an uninterrupted one
        print(
            f"opd-trainer: note: resuming with changed settings: {', '.join(changed)}",
            file=sys.stderr,
        )
    return cfg


# Settings that do not change what a resumed run computes (config.json never holds the API key).
_NOT_THE_RUNS_COURSE = {
    "teacher_url",  # another replica of the same teacher: checked by its tokenizer at connect
    "progress",
    "threads",
    "teacher_load_wait_s",
    "teacher_timeout_s",
    "streams_per_url",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plot":
        from services.trainer.report import plot_runs, read_evals

        try:
            empty = [r for r in args.runs if not read_evals(Path(r))]
        except (OSError, ValueError) as exc:
            print(f"opd-trainer: error: {exc}", file=sys.stderr)
            return 2
        if empty:
            print(
                f"opd-trainer: error: no evaluations in {', '.join(empty)} (no eval.jsonl, or an "
                "empty one)",
                file=sys.stderr,
            )
            return 2
        try:
            print(plot_runs([Path(r) for r in args.runs], args.out))
        except OSError as exc:
            why = exc.strerror
            if isinstance(exc, (FileExistsError, NotADirectoryError)):  # a folder on the way
                why = f"a file is in the way of the folder {exc.filename}"
            print(f"opd-trainer: error: --out {args.out}: {why}", file=sys.stderr)
            return 2
        return 0
    if args.command == "serve":
        from services.trainer.api import LOOPBACK_NAMES, TrainerServer, create_app, loopback_only

        if taken := cannot_listen(args.host, args.port):
            print(f"opd-trainer: error: {taken}", file=sys.stderr)
            return 2
        try:
            hosts = LOOPBACK_NAMES if loopback_only(args.host) else ()
            server = TrainerServer(create_app(args.max_runs, hosts), args.host, args.port)
            server.run()
        except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it caught again once it has shut down
            return 130
        # Not always (a CI run saw a Ctrl-C'd server exit 0): the status comes from the signal seen.
        return 130 if server.interrupted else 0
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"opd-trainer: error: {line}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"opd-trainer: error: {exc}", file=sys.stderr)
        return 2
    return run_from_cli(cfg)


def run_from_cli(cfg: RunConfig) -> int:
    import logging

    from opd.models import ModelLoadError
    from services.trainer.loop import Run, RunError
    from shared.errors import TeacherError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    trainer = Run(cfg, stop=stop)
    signalled = 0

    def stop_after_this_step(signum, frame) -> None:
        nonlocal signalled
        signalled += 1
        if signalled == 1:
            stop.set()
            print(
                "\nopd-trainer: stopping after this step, with a checkpoint (again to give up on "
                "the step)",
                file=sys.stderr,
            )
        elif signalled == 2:  # a step waiting on a hung teacher would not end for minutes
            trainer.abandon_step("interrupted")
            print(
                "\nopd-trainer: giving up on this step, saving the one before (again to stop at "
                "once)",
                file=sys.stderr,
            )
        else:
            raise KeyboardInterrupt

    # Ctrl-C, `timeout`, `docker stop`: the run ends its step and saves, so --resume goes on.
    signals = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        before = {sig: signal.signal(sig, stop_after_this_step) for sig in signals}
    else:
        before = {}
    try:
        summary = trainer.run()
    # OSError: a full disk, a folder it may not write (the checkpoints made so far are kept).
    except (TeacherError, ModelLoadError, RunError, OSError) as exc:
        print(f"opd-trainer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "opd-trainer: interrupted; --resume goes on from the last checkpoint", file=sys.stderr
        )
        return 130
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    print(json.dumps({k: v for k, v in summary.items() if k != "state"}, indent=1))
    return 0 if summary["completed"] else 130


if __name__ == "__main__":
    sys.exit(main())
