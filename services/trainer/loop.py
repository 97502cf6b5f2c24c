"""The on-policy distillation run: each step samples rollouts to the current horizon, streams them to
the teacher, and updates the student on the teacher's per-token feedback. It orchestrates; the math
lives in schedules, rollout, step and losses.

    summary = run(RunConfig(schedule="truncated:0.1", steps=100, out="runs/topd-10"))
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import itertools
import json
import logging
import os
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from opd.evaluate import EvaluationStopped, evaluate
from opd.models import ModelLoadError, load_model
from services.trainer import checkpoint
from services.trainer.config import RunConfig
from services.trainer.report import JsonlLog, hidden_fraction, plot_runs, read_jsonl
from services.trainer.rollout import sample_rollouts
from services.trainer.schedules import (
    Schedule,
    ScheduleError,
    parse_schedule,
    same_horizons,
    warmup_lr,
)
from services.trainer.step import accumulate_gradients
from services.trainer.teacher_feed import StepAbandoned, StepFeed, TeacherFeed
from shared.client import TeacherTimedOut
from shared.errors import Unauthorized
from shared.loop_thread import Stopped
from shared.protocol import json_logprobs
from shared.task import LONGEST_PROMPT, Problem, problem_stream, problems

log = logging.getLogger("opd.trainer")
Events = Callable[[dict], None]


class RunError(Exception):
    """A run that cannot start as configured (its message says which setting and why; `param`
    names that setting's field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_out(cfg: RunConfig) -> checkpoint.TrainState | None:
    """Refuse, before any work, what the run in `out` does not allow: starting over in it unless
    told to (--resume continues it, --overwrite replaces it: nothing is lost by accident), and a
    --resume that its last checkpoint cannot continue exactly. Returns the state of the checkpoint
    a --resume continues from, if there is one."""
    out = Path(cfg.out)
    check_can_make(out)
    if (out / "config.json").is_file() and not _a_runs_config(out / "config.json"):
        # A model folder's, say: the run would write its own config.json over it.
        raise RunError(
            f"--out {out} holds a config.json that is not a run's (a model's?), which a run "
            "would write over: give another --out",
            param="out",
        )
    if (out / LOCK_FILE).is_file():  # a run writing there now, in this process or another
        lock_out(out).close()
    found = checkpoint.latest(out)
    if cfg.resume and not has_config_or_checkpoint(out) and holds_a_run(out):
        # A resume with nothing to resume from starts at step 0, which empties the logs.
        raise RunError(
            f"--out {out} holds a run's logs but no config.json or checkpoint, so nothing to "
            "resume: --overwrite to start over in it, or another --out",
            param="resume",
        )
    if holds_a_run(out) and not (cfg.resume or cfg.overwrite):
        held = f"checkpoint {found.name}" if found else "no checkpoint yet"
        raise RunError(
            f"--out {out} holds a run ({held}): --resume to continue it, --overwrite to start "
            "over, or another --out",
            param="out",
        )
    if cfg.resume and found is not None:
        return check_resumable(cfg, found)
    return None


# Locked (flock) by the run writing into its folder: two runs there would interleave their files.
LOCK_FILE = ".lock"


def lock_out(out: Path) -> TextIO:
    """Hold `out` for one run: an exclusive lock on its lock file, which lasts until the file is
    closed or the process ends (so a killed run leaves no stale lock)."""
    handle = open(out / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunError(
            f"--out {out} is in use by another run (it holds {out / LOCK_FILE})", param="out"
        ) from None
    return handle


def folder_state(out: Path) -> tuple:
    """What a run in `out` has written so far (its last checkpoint and config.json's time): a run
    compares it before and after taking the folder's lock, so no other run slipped in between."""
    config = out / "config.json"
    return checkpoint.latest(out), config.stat().st_mtime_ns if config.is_file() else None


def holds_a_run(out: Path) -> bool:
    """Whether a run has written into `out`: its config, a checkpoint, or steps or evaluations in
    its logs (a folder of logs alone, its config.json deleted say: a new run would empty them)."""
    logged = any(_not_empty(out / name) for name in ("metrics.jsonl", "eval.jsonl"))
    return logged or has_config_or_checkpoint(out)


def has_config_or_checkpoint(out: Path) -> bool:
    """Whether a run's own files are in `out` (what --resume continues and --overwrite deletes)."""
    return folder_state(out) != (None, None)


def _a_runs_config(path: Path) -> bool:
    try:
        saved = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"schedule", "teacher_url"} <= saved.keys()


def _not_empty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def check_can_make(out: Path) -> None:
    """`out` is a folder, or one that can be made: its nearest existing parent is a folder this
    process may write in (checked without making anything, so a refused run leaves nothing)."""
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        where = "" if parent == out.absolute() else f": {parent}"
        raise RunError(f"--out {out}{where} is a file, not a folder", param="out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {out}: no permission to write in {parent}", param="out")


def check_resumable(cfg: RunConfig, found: Path) -> checkpoint.TrainState:
    """The checkpoint `found` continues into this config: the same horizon at every step (from the
    schedule and the max_new_tokens it was trained with), and no fewer steps than it has done."""
    try:
        state = checkpoint.read_state(found)
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(
            f"--resume: {found}/state.json is unreadable ({exc})", param="resume"
        ) from None
    try:
        checkpoint.check_readable(found)
    except checkpoint.UnreadableCheckpoint as exc:
        raise RunError(f"--resume: {exc}", param="resume") from None
    if state.step > cfg.steps:
        raise RunError(
            f"--resume: {found} is at step {state.step}, past --steps {cfg.steps}; give "
            f"--steps {state.step} or more",
            param="steps",
        )
    now = parse_schedule(cfg.schedule, cfg.max_new_tokens)
    trained_max = state.max_new_tokens or cfg.max_new_tokens  # older checkpoints kept none
    try:
        trained = parse_schedule(state.schedule, trained_max)
    except ScheduleError:
        trained = None
    # Compared as horizons, so `truncated:0.1` and `truncated:0.10` are the same schedule.
    if trained is None or not same_horizons(trained, now, cfg.steps):
        raise RunError(
            f"--resume: {found} was trained with --schedule {state.schedule} at "
            f"--max-new-tokens {trained_max}; {cfg.schedule} at {cfg.max_new_tokens} gives other "
            "horizons: resume with the same, or start a new --out",
            param="max_new_tokens" if _same_spec(state.schedule, now) else "schedule",
        )
    return state


def _same_spec(spec: str, schedule: Schedule) -> bool:
    """`spec` is `schedule`'s own spec, whatever H_max it was given."""
    try:
        return parse_schedule(spec, schedule.h_max) == schedule
    except ScheduleError:
        return False


def finished_summary(cfg: RunConfig, resumed: checkpoint.TrainState | None) -> dict | None:
    """The summary of the run in `out` when the checkpoint a --resume continues from is at --steps
    already and the summary is complete: then there is nothing left to do."""
    if resumed is None or resumed.step != cfg.steps:
        return None
    try:
        summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    done = isinstance(summary, dict) and summary.get("completed") is True
    return summary if done and summary.get("steps") == cfg.steps else None


def check_teacher_limits(
    cfg: RunConfig, infos: list[dict], tokenizer, student_vocab: int | None
) -> None:
    """Refuse settings a teacher replica would reject mid-run: a top-k above its max_top_k, the
    task's longest prompt plus the schedule's longest horizon beyond its max_seq_len, or a student
    whose vocabulary (`student_vocab` rows) has ids past the teacher's."""
    # A bound, not one prompt's count: with merges another prompt of the same length may take more
    # tokens. Each character is at most one token, plus the special ones and a prefix space's.
    bound = len(LONGEST_PROMPT) + tokenizer.num_special_tokens_to_add() + 1
    longest_prompt = max(bound, len(tokenizer(LONGEST_PROMPT)["input_ids"]))
    # Horizons never shrink, so the last step's is the longest.
    longest_horizon = parse_schedule(cfg.schedule, cfg.max_new_tokens).horizon(cfg.steps - 1)
    for url, info in zip(cfg.teacher_url, infos):
        if student_vocab is not None and student_vocab > info["vocab_size"]:
            # The padded rows of the student's: the tokenizer is the same (its fingerprint).
            raise RunError(
                f"--student {cfg.student} has a vocabulary of {student_vocab} ids, the teacher at "
                f"{url} of {info['vocab_size']}: the student could sample ids the teacher cannot "
                "score",
                param="student",
            )
        if cfg.teacher_top_k > info["max_top_k"]:
            raise RunError(
                f"--top-k {cfg.top_k}: the teacher at {url} allows at most {info['max_top_k']}",
                param="top_k",
            )
        if longest_prompt + longest_horizon > info["max_seq_len"]:
            raise RunError(
                f"--schedule {cfg.schedule} with --max-new-tokens {cfg.max_new_tokens} reaches "
                f"{longest_horizon} tokens; with prompts of up to {longest_prompt} that exceeds "
                f"the max_seq_len {info['max_seq_len']} of the teacher at {url}",
                # The field to change: H_max when the schedule reaches it, else the schedule.
                param="max_new_tokens" if longest_horizon == cfg.max_new_tokens else "schedule",
            )


def training_problems(cfg: RunConfig, position: int = 0) -> Iterator[Problem]:
    """The run's training problems from `position` on (a resumed run skips those it has used)."""
    return itertools.islice(problem_stream("train", cfg.seed), position, None)


def peak_memory(device: str) -> dict:
    """This process's peak resident memory (since reset_peak_rss), and on a GPU the peak memory
    torch allocated there since the run started (runs that a server trains at once share both)."""
    peak = {"peak_rss_mb": round(_peak_rss_bytes() / 2**20, 1)}
    if torch.device(device).type == "cuda":
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def reset_peak_rss() -> None:
    """Start the process's peak resident memory afresh (Linux; elsewhere it stays the process's), so
    that runs one after another in one process (the demo) each report their own. What an earlier
    run freed is handed back to the system first: the peak restarts from what the process holds,
    and memory the allocator merely kept would count against the next run."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    with contextlib.suppress(OSError):  # VmHWM is the peak that clear_refs resets
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    # ru_maxrss counts KiB on Linux and bytes on macOS.
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of one step: a resumed run draws the same rollouts as an uninterrupted one."""
    return seed * 1_000_003 + step


class Run:
    def __init__(
        self, cfg: RunConfig, events: Events | None = None, stop: threading.Event | None = None
    ):
        self.cfg = cfg
        self.events = events or (lambda event: None)
        self.stop = stop or threading.Event()
        self.out = Path(cfg.out)
        self.feed: TeacherFeed | None = None  # opened in setup, closed when the run ends
        self.lock: TextIO | None = None  # on out, taken in setup, let go when the run ends
        self.rng_before_failed_step: dict | None = None  # while a step is under way
        self.step_feed: StepFeed | None = None  # the step under way's, while it is

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        try:
            self.model, self.tokenizer = load_model(cfg.student, device=cfg.device)
        except ModelLoadError as exc:
            param = "device" if exc.setting == "device" else "student"
            raise RunError(f"--{param} {exc}", param=param) from None
        if torch.device(cfg.device).type == "cuda":  # a device load_model found: peak_gpu_mb
            torch.cuda.reset_peak_memory_stats(cfg.device)  # counts from this run's start
        self.schedule = parse_schedule(cfg.schedule, cfg.max_new_tokens)
        self.eval_set = problems("eval", cfg.eval_n, cfg.seed)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        found_before = folder_state(self.out)
        resumed = self._resume()
        self.data = training_problems(cfg, self.state.data_position)
        # Refuse a teacher that is down, speaks another tokenizer or is too small before any work.
        self.feed = TeacherFeed(
            cfg.teacher_url,
            cfg.api_key,
            timeout=cfg.teacher_timeout_s,
            streams_per_url=cfg.streams_per_url,
        )
        try:
            infos = self.feed.call(
                self.feed.client.connect(self.tokenizer, wait_s=cfg.teacher_load_wait_s),
                stop=self.stop,  # a teacher may take minutes to load: a stop must not wait for it
            )
        except Unauthorized as exc:
            raise RunError(
                f"{exc} (the teacher's key goes in --api-key)", param="api_key"
            ) from None
        check_teacher_limits(
            cfg, infos, self.tokenizer, getattr(self.model.config, "vocab_size", None)
        )
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(
                f"--out {self.out}: cannot make the run folder ({exc.strerror})", param="out"
            ) from None
        self.lock = lock_out(self.out)  # before anything in it is deleted or written
        if folder_state(self.out) != found_before:  # checked while a teacher loaded, say
            raise RunError(
                f"--out {self.out}: another run wrote into it while this one started; start "
                "this one again to check the folder afresh",
                param="out",
            )
        # The old run's checkpoints and results must not outlive it; a folder that holds no run
        # keeps what it has (its "checkpoints" are not ours to delete).
        if cfg.overwrite and has_config_or_checkpoint(self.out):
            shutil.rmtree(checkpoint.checkpoint_dir(self.out), ignore_errors=True)
            for name in ("summary.json", "accuracy.png"):
                (self.out / name).unlink(missing_ok=True)
        keep = self.state.step if resumed else None
        try:
            self.metrics_log = JsonlLog(self.out / "metrics.jsonl", keep)
            self.eval_log = JsonlLog(self.out / "eval.jsonl", keep)
        except ValueError as exc:  # a damaged line before the last: not one a kill leaves
            raise RunError(f"--resume: {exc}", param="resume") from None
        # After the logs are found whole: a refused --resume leaves the settings it was run with.
        (self.out / "config.json").write_text(cfg.model_dump_json(indent=1, exclude={"api_key"}))
        self.events({"type": "started", "step": self.state.step, "resumed": resumed})

    def _resume(self) -> bool:
        """Load the last checkpoint in `out` when asked to; whether one was loaded."""
        cfg = self.cfg
        self.state = checkpoint.TrainState(
            step=0,
            data_position=0,
            schedule=cfg.schedule,
            elapsed_s=0.0,
            teacher_tokens=0,
            tokens_generated=0,
            max_new_tokens=cfg.max_new_tokens,
        )
        found = checkpoint.latest(self.out) if cfg.resume else None
        if cfg.resume and found is None:
            log.warning("--resume: no checkpoint in %s, so starting from step 0", self.out)
        if found is None:
            return False
        try:  # check_out has checked its horizons and step
            self.state = checkpoint.load(found, self.model, self.optimizer)
        except ValueError as exc:
            raise RunError(f"--resume: {exc} (--student {cfg.student})", param="student") from None
        except checkpoint.UnreadableCheckpoint as exc:
            raise RunError(f"--resume: {exc}", param="resume") from None
        # The same horizons, as checked, in the words of this run: its next checkpoint pairs the
        # spec with the H_max it was checked at (truncated:100 at 256 saved as full, at 256, would
        # give other horizons and refuse every later --resume).
        self.state.schedule, self.state.max_new_tokens = cfg.schedule, cfg.max_new_tokens
        for group in self.optimizer.param_groups:  # loading brought back the saved one
            group["weight_decay"] = cfg.weight_decay
        log.info("resumed from %s at step %d", found, self.state.step)
        return True

    def run(self) -> dict:
        finished = finished_summary(self.cfg, check_out(self.cfg))
        if finished is not None:
            log.info("%s finished at step %d already; nothing to do", self.out, self.cfg.steps)
            self.events({"type": "done", **finished})
            return finished
        try:
            self.setup()
            return self._train()
        except Stopped:
            return self._stopped_before_start()
        except TeacherTimedOut as exc:
            raise RunError(
                f"{exc}; --teacher-timeout-s gives a teacher longer "
                f"(now {self.cfg.teacher_timeout_s:g} s)",
                param="teacher_timeout_s",
            ) from None
        finally:
            if self.feed is not None:
                self.feed.close()
            if self.lock is not None:
                self.lock.close()

    def _stopped_before_start(self) -> dict:
        """Stopped while its teachers were still loading: nothing was done, so nothing is written."""
        log.warning("stopped while waiting for the teacher to load; nothing was done")
        summary = {"schedule": self.cfg.schedule, "steps": self.state.step, "completed": False}
        self.events({"type": "done", **summary})
        return summary

    def _train(self) -> dict:
        cfg, state = self.cfg, self.state
        if self._evaluation_missing():
            self._evaluate_unless_stopped()
        bar = tqdm(
            total=cfg.steps,
            initial=state.step,
            desc=Path(cfg.out).name,
            unit="step",
            disable=not cfg.progress,
        )
        last_acc = None
        try:
            while state.step < cfg.steps and not self.stop.is_set():
                record, sample = self._step()
                # Written first: an event that fails (its listener gone) must not cost the record.
                self.metrics_log.write(record)
                self.events(sample)
                self.events({"type": "step", **record})
                # A stop skips the evaluation, so it saves at once; --resume makes it up.
                if self._evaluation_due() and not self.stop.is_set():
                    evaluated = self._evaluate_unless_stopped()
                    last_acc = evaluated["accuracy"] if evaluated else last_acc
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    self._checkpoint()
                bar.update(1)
                bar.set_postfix(
                    H=record["horizon"],
                    rkl=f"{record['reverse_kl']:.3f}",
                    acc="-" if last_acc is None else f"{last_acc:.1%}",
                    tok_s=f"{record['tokens_generated'] / record['generate_s']:.0f}",
                )
        except StepAbandoned as exc:  # the run ends as stopped, after the step before this one
            log.warning("step %d given up on: %s", state.step + 1, exc)
            self._drop_unfinished_step()
        except Exception:
            self._keep_steps_done()
            raise
        finally:
            bar.close()
        # Saved first: a final evaluation that fails or is interrupted loses no training.
        self._checkpoint()
        # A stop during the last step skips the final evaluation too; --resume runs it.
        done = state.step == cfg.steps and not self.stop.is_set()
        final = self._final_evaluation() if done else None
        return self._summary(final)

    def _step(self) -> tuple[dict, dict]:
        """One step: its metrics record, and a sample rollout with its scores as an event."""
        cfg, state = self.cfg, self.state
        horizon = self.schedule.horizon(state.step)
        batch = list(itertools.islice(self.data, cfg.prompts_per_step))
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_lr(state.step, cfg.lr, cfg.warmup_steps)
        # Put back should the step fail: its training passes draw from them (--dropout).
        self.rng_before_failed_step = checkpoint.rng_states()
        started = time.perf_counter()
        rollouts, feed = self._sample(batch, horizon)
        generated = time.perf_counter()
        result, scores, fstats, grad_norm = self._update(feed)
        done = time.perf_counter()
        self.rng_before_failed_step = self.step_feed = None

        state.step += 1
        state.data_position += len(batch)
        state.elapsed_s += done - started
        tokens = sum(len(r.completion_ids) for r in rollouts)
        state.tokens_generated += tokens
        state.teacher_tokens += fstats.scored_tokens
        # Backpressure (put blocked) is waiting on the teacher too, not generating.
        teacher_wait = fstats.wait_s + fstats.put_wait_s
        record = {
            "step": state.step,
            "horizon": horizon,
            "truncated_fraction": sum(not r.finished for r in rollouts) / len(rollouts),
            # Share of rollout tokens left out of the loss by --cut-at-error (0 when it is off).
            "cut_fraction": result.cut_tokens / max(1, tokens),
            "reverse_kl": result.reverse_kl,
            "loss": result.loss,
            "grad_norm": grad_norm,
            "step_s": done - started,
            "generate_s": generated - started - fstats.put_wait_s,
            "teacher_wait_s": teacher_wait,
            "teacher_compute_s": fstats.compute_s,
            # Share of the teacher's scoring time spent while the student generated or trained on
            # scored micro-batches; None when the teacher does not time its forwards (vllm backend).
            "teacher_hidden_fraction": hidden_fraction(teacher_wait, fstats.compute_s),
            "update_s": done - generated - fstats.wait_s,
            "tokens_generated": tokens,
            "teacher_tokens": fstats.scored_tokens,
            "rescored": fstats.rescored,
            "train_s": state.elapsed_s,
            **peak_memory(self.cfg.device),
            "kl_by_position": result.kl_profile,
        }
        return record, self._sample_event(rollouts[0], scores[rollouts[0].key])

    def _sample(self, batch: list[Problem], horizon: int):
        """The step's rollouts, each micro-batch streamed to the teacher as soon as it is sampled;
        and the feed its scores come back on."""
        cfg = self.cfg
        seed = step_seed(cfg.seed, self.state.step)
        generator = torch.Generator(self.model.device).manual_seed(seed)
        feed = self.step_feed = self.feed.begin(max_positions=horizon, top_k=cfg.teacher_top_k)
        rollouts = sample_rollouts(
            self.model,
            self.tokenizer,
            batch,
            cfg.samples_per_prompt,
            horizon,
            generator,
            feed.put,
            cfg.micro_batch,
        )
        return rollouts, feed

    def _update(self, feed):
        """Backpropagate each micro-batch as its scores come back, then take one optimizer step;
        the loss terms, the scores, the feed's statistics and the gradient norm before clipping."""
        # Rollouts are sampled with dropout off: a training pass with it on would give other
        # log-probs for the same tokens, noise in every advantage and ratio.
        self.model.train(self.cfg.dropout)
        self.optimizer.zero_grad(set_to_none=True)
        result = accumulate_gradients(self.model, feed.scored_frames(), self.cfg)
        scores, fstats = feed.finish()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.model.eval()
        return result, scores, fstats, float(grad_norm)

    def _sample_event(self, rollout, score) -> dict:
        """A rollout with the teacher's and the student's log-probs, for the run's listeners."""
        decode = self.tokenizer.decode
        return {
            "type": "sample",
            "step": self.state.step,
            "prompt": decode(rollout.prompt_ids, skip_special_tokens=True),
            "completion": decode(rollout.completion_ids, skip_special_tokens=False),
            # The wire's JSON form: an impossible token's -inf is LOWEST_LOGPROB, not null.
            "teacher_logprobs": [round(x, 4) for x in json_logprobs(score.logprobs)],
            "student_logprobs": [round(x, 4) for x in rollout.sample_logprobs],
        }

    def _evaluation_due(self) -> bool:
        """Step 0 and every --eval-every steps are evaluated (the last one by _final_evaluation)."""
        step, every = self.state.step, self.cfg.eval_every
        return step < self.cfg.steps and (step == 0 or (every > 0 and step % every == 0))

    def _evaluation_missing(self) -> bool:
        """This step is due an evaluation that eval.jsonl lacks: a new run's step 0, or a
        resumed run's step whose evaluation a stop skipped."""
        if self.stop.is_set() or not self._evaluation_due():
            return False
        return self._evaluation_at(self.state.step) is None

    def _final_evaluation(self) -> dict | None:
        """The evaluation at the last step; a resumed run that has one already keeps it."""
        done = self._evaluation_at(self.cfg.steps)
        if done is not None:
            return done
        return self._evaluate_unless_stopped(samples=self.cfg.eval_samples)

    def _evaluation_at(self, step: int) -> dict | None:
        """The last record of eval.jsonl at `step`, if there is one."""
        done = [r for r in read_jsonl(self.out / "eval.jsonl") if r["step"] == step]
        return done[-1] if done else None

    def _evaluate_unless_stopped(self, samples: int = 0) -> dict | None:
        """The evaluation at this step, or None when a stop ended it (--resume runs it then)."""
        try:
            return self._evaluate(samples)
        except EvaluationStopped:
            log.info("stopped during the evaluation at step %d", self.state.step)
            return None

    def _evaluate(self, samples: int = 0) -> dict:
        greedy = evaluate(self.model, self.tokenizer, self.eval_set, progress=False, stop=self.stop)
        record = {
            "step": self.state.step,
            "accuracy": greedy.accuracy,
            "well_formed": greedy.well_formed,
            "mean_tokens": greedy.mean_tokens,
            "train_s": self.state.elapsed_s,
            "teacher_tokens": self.state.teacher_tokens,
            "tokens_generated": self.state.tokens_generated,
        }
        if samples > 0:
            sampled = evaluate(
                self.model,
                self.tokenizer,
                self.eval_set,
                samples=samples,
                seed=self.cfg.seed,
                progress=False,
                temperature=1.0,
                stop=self.stop,
            )
            record[f"avg@{samples}"] = sampled.accuracy
        self.eval_log.write(record)
        self.events({"type": "eval", **record})
        return record

    def _keep_steps_done(self) -> None:
        """A run failing mid-way (its teachers gone, say) keeps the steps it finished: a failed step
        changes no weight before its optimizer step, so the weights in memory are the last whole
        step's, and a checkpoint of them (with the random generators as that step left them) lets
        --resume go on from there, not from step 0."""
        self._drop_unfinished_step()
        try:
            self._checkpoint()
        except Exception as exc:  # the failure itself matters more; say this and let it through
            log.error("could not save a checkpoint of step %d: %s", self.state.step, exc)
        else:
            if self.state.step:
                log.warning(
                    "the run failed after step %d; saved %s: --resume continues from it",
                    self.state.step,
                    checkpoint.latest(self.out),
                )

    def _drop_unfinished_step(self) -> None:
        """Put the random generators back as the last whole step left them (a step that did not
        finish has changed no weight: its optimizer step comes last)."""
        if self.rng_before_failed_step is not None:
            checkpoint.set_rng_states(self.rng_before_failed_step)
            self.rng_before_failed_step = None

    def abandon_step(self, reason: str) -> None:
        """From another thread: stop the run, and give up on the step under way now if it waits
        on its teachers (generating and training it take bounded time; a hung teacher may not).
        The run then saves the step before it, as a stop does, and ends as stopped."""
        self.stop.set()
        if (feed := self.step_feed) is not None:
            feed.abandon(reason)

    def _checkpoint(self) -> None:
        if self.state.step == 0:  # stopped before its first step: nothing to keep
            return
        found = checkpoint.latest(self.out)
        if found is not None and found.name == checkpoint.step_name(self.state.step):
            # Saved already (the last step was a periodic one, or a stop came right after it):
            # writing it again would replace the folder `latest` names, leaving a moment with none.
            return
        checkpoint.save(self.out, self.model, self.tokenizer, self.optimizer, self.state)

    def _summary(self, final: dict | None) -> dict:
        evals = read_jsonl(self.out / "eval.jsonl")
        summary = {
            "schedule": self.cfg.schedule,
            "steps": self.state.step,
            "completed": final is not None,  # its last step and the final evaluation done
            "initial_accuracy": evals[0]["accuracy"] if evals else None,
            "final_accuracy": final["accuracy"] if final else None,
            **({k: v for k, v in final.items() if k.startswith("avg@")} if final else {}),
            "train_s": round(self.state.elapsed_s, 2),
            "tokens_generated": self.state.tokens_generated,
            "teacher_tokens": self.state.teacher_tokens,
            **peak_memory(self.cfg.device),
            "state": asdict(self.state),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        if evals:  # none when the run was stopped before it began
            plot_runs(
                [self.out], self.out / "accuracy.png", title=f"{self.out.name}: {self.cfg.schedule}"
            )
        self.events({"type": "done", **summary})
        return summary


def run(cfg: RunConfig, events: Events | None = None, stop: threading.Event | None = None) -> dict:
    return Run(cfg, events, stop).run()
