"""The README's main job: distil models/tiny-teacher into models/tiny-student with each horizon
schedule, against a real teacher server on loopback, and compare them.

The teacher runs in its own process pinned to its own core; the trainer takes the other. Every run
uses the same seed and step budget; the table reports final accuracy, training wall-clock, tokens
generated, teacher tokens scored, peak memory, and when each run first came within 2 points of full
OPD's final accuracy, and comparison.png plots accuracy against steps, wall-clock and teacher tokens.

    opd demo                                        # about 7 minutes on 2 CPU cores
    opd demo --loss reverse_kl                      # the paper's policy-gradient loss instead
    opd demo --steps 4 --schedules full topd-10     # a smoke run
    opd demo --teacher-url http://10.0.0.5:8000     # against a teacher already serving
    opd demo --device cuda --prompts-per-step 1024 --micro-batch 256 --steps 40 --eval-every 10
                                                    # on a GPU, at 64 times the batch
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from opd.bundled import STUDENT_PATH, TEACHER_PATH
from opd.models import ModelLoadError, check_loadable
from services.teacher.process import free_port, start_teacher, stop
from services.trainer.config import DEMO_DEFAULTS, DEMO_RUN_SETTINGS, RunConfig, run_folder
from services.trainer.loop import holds_a_run, reset_peak_rss, run
from services.trainer.report import (
    first_reaching,
    hidden_fraction,
    plot_runs,
    read_evals,
    read_jsonl,
)

# The mark for a schedule that matches full OPD: its final accuracy less 2 points.
MATCH_POINTS = 0.02

# name -> schedule spec. H_max is 256 tokens; the longest worked solution is 225.
SCHEDULES = {
    "full": "full",
    "topd-10": "truncated:0.1",
    "topd-25": "truncated:0.25",
    "topd-50": "truncated:0.5",
    "popd": "progressive:h0=32,dh=32,every=6",
}


# A teacher the demo starts on a GPU scores a whole micro-batch of rollouts in one forward: there the
# tiny teacher's forward costs about the same from one row up to ~10^5 tokens.
GPU_TEACHER_ARGS = ("--max-batch-tokens", "131072")


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    steps: int = 24
    eval_every: int = 12
    eval_n: int = 200
    seed: int = 0
    # RunConfig fields set for every run, e.g. {"device": "cuda", "prompts_per_step": 1024}
    run_settings: dict = field(default_factory=dict)
    schedules: tuple[str, ...] = tuple(SCHEDULES)
    teacher_url: str | None = (
        None  # use this teacher (e.g. a load balancer) instead of starting one
    )
    api_key: str | None = None  # the teacher's key, if it needs one

    def __post_init__(self):
        if unknown := set(self.run_settings) - set(DEMO_RUN_SETTINGS):
            raise ValueError(f"run_settings may set {DEMO_RUN_SETTINGS}, not {sorted(unknown)}")
        self.out = run_folder(self.out)  # where its runs write, so it checks them there


def run_configs(cfg: DemoConfig, url: str) -> dict[str, RunConfig]:
    """One run per schedule, same seed and budget (validated here, before any work)."""
    return {
        name: RunConfig(
            student=str(STUDENT_PATH),
            teacher_url=[url],
            schedule=SCHEDULES[name],
            steps=cfg.steps,
            out=str(Path(cfg.out) / name),
            seed=cfg.seed,
            overwrite=True,  # the demo's runs are its own to redo
            eval_every=cfg.eval_every,
            eval_n=cfg.eval_n,
            threads=1,
            api_key=cfg.api_key,
            **{**DEMO_DEFAULTS, **cfg.run_settings},
        )
        for name in cfg.schedules
    }


def run_demo(cfg: DemoConfig) -> list[dict]:
    out = Path(cfg.out)
    # Bad settings (a URL that is none, say) are refused before a teacher starts; a teacher of our
    # own gets its port now, so its URL is checked like any other.
    port = None if cfg.teacher_url is not None else free_port()
    url = cfg.teacher_url if port is None else f"http://127.0.0.1:{port}"
    configs = run_configs(cfg, url)
    first = next(iter(configs.values()))  # the runs differ only in schedule and folder
    try:  # what stops the runs, said before a teacher starts
        check_loadable(first.student, first.device)
    except ModelLoadError as exc:  # the bundled student is no flag's: only --device is the user's
        raise ModelLoadError(f"--device {exc}" if exc.setting == "device" else str(exc)) from None
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file")
    made = check_runs_are_the_demos(out, configs)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    mark = out / DEMO_MARK
    schedules = [name for name in SCHEDULES if name in made or name in configs]
    mark.write_text(json.dumps({"schedules": schedules, "steps": cfg.steps, "seed": cfg.seed}))
    try:
        return _run_all(cfg, configs, first, out, port)
    except BaseException:
        if created and list(out.iterdir()) == [mark]:  # a demo that did nothing leaves nothing
            mark.unlink()
            out.rmdir()
        raise


# Written first in the demo's --out: it names the run folders there that are the demo's own to redo.
DEMO_MARK = "demo.json"


def check_runs_are_the_demos(out: Path, configs: dict[str, RunConfig]) -> set[str]:
    """Refuses to redo a run folder the demo did not make (`opd demo --out runs` would replace a
    user's runs/full): FileExistsError naming it. Returns the run folders earlier demos made
    there, as their mark names them (an older demo's results.json, its rows)."""
    made = demos_runs(out)
    theirs = [str(out / name) for name in configs if name not in made and holds_a_run(out / name)]
    if theirs:
        raise FileExistsError(
            f"--out {out}: {', '.join(theirs)} holds a run the demo did not make, which it would "
            "replace: give another --out"
        )
    return made


def demos_runs(out: Path) -> set[str]:
    """The run folders in `out` that earlier demos made, as their mark says (none if it cannot be
    read: then every run folder there is taken for the user's)."""
    try:
        if (out / DEMO_MARK).is_file():
            return set(json.loads((out / DEMO_MARK).read_text())["schedules"]) & set(SCHEDULES)
        if (out / "results.json").is_file():  # an older demo's, written at its end
            return {row["run"] for row in json.loads((out / "results.json").read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return set()


def _run_all(
    cfg: DemoConfig, configs: dict[str, RunConfig], first: RunConfig, out: Path, port: int | None
) -> list[dict]:
    """Runs `configs`, which differ from `first` only in schedule and folder."""

    def forget_earlier_results(event: dict) -> None:
        # Once the first run has begun (its teacher answered, its folder is its own): an earlier
        # demo's table must not pass for this one's, but a demo that could not start keeps it.
        if event["type"] == "started":
            for name in ("results.json", "comparison.png"):
                (out / name).unlink(missing_ok=True)

    own_teacher = port is not None
    device = first.device
    on_cpu = device == "cpu"
    # On CPU a teacher of our own gets one core and the student another, as the measured numbers
    # assume; the cores come from those this process may use (taskset, a container's cpuset).
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    two_cores = own_teacher and on_cpu and len(allowed) >= 2
    if own_teacher:
        proc, _ = start_teacher(
            str(TEACHER_PATH),
            port=port,
            threads=1,
            cpus={allowed[1]} if two_cores else None,
            extra_args=() if on_cpu else ("--device", device, *GPU_TEACHER_ARGS),
            log_path=str(out / "teacher.log"),
        )
    else:
        proc = None
    if two_cores:
        os.sched_setaffinity(0, {allowed[0]})
    rows = []
    try:
        for name, run_cfg in configs.items():
            print(f"== {name}: schedule {SCHEDULES[name]}", flush=True)
            reset_peak_rss()  # each run's own peak, not the largest of those before it
            summary = run(run_cfg, events=None if rows else forget_earlier_results)
            rows.append(_row(name, out / name, summary))
    finally:
        if proc is not None:
            stop(proc)
        if two_cores:
            os.sched_setaffinity(0, allowed)
    plot_runs(
        [out / r["run"] for r in rows],
        out / "comparison.png",
        title=f"OPD horizon schedules, {cfg.steps} step{'s' * (cfg.steps != 1)} of "
        f"{first.prompts_per_step} x {first.samples_per_prompt} rollouts, lr {first.lr:g}, same seed",
    )
    against_full(rows, out)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print_table(rows)
    print(f"\nplots: {out / 'comparison.png'}; per run: {out}/<run>/metrics.jsonl, eval.jsonl")
    return rows


def _row(name: str, folder: Path, summary: dict) -> dict:
    steps = read_jsonl(folder / "metrics.jsonl")
    return {
        "run": name,
        "schedule": summary["schedule"],
        "initial_accuracy": summary["initial_accuracy"],
        "final_accuracy": summary["final_accuracy"],
        **{k: v for k, v in summary.items() if k.startswith("avg@")},  # with --eval-samples
        "train_s": summary["train_s"],
        "tokens_generated": summary["tokens_generated"],
        "teacher_tokens": summary["teacher_tokens"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "peak_gpu_mb": summary.get("peak_gpu_mb"),  # a student on a GPU: what torch allocated there
        "generate_s": statistics.mean(s["generate_s"] for s in steps),
        "teacher_wait_s": statistics.mean(s["teacher_wait_s"] for s in steps),
        "update_s": statistics.mean(s["update_s"] for s in steps),
        "hidden": hidden_share(steps),
    }


def against_full(rows: list[dict], out: Path) -> None:
    """Adds to each row when its run first came within MATCH_POINTS of full OPD's final accuracy:
    `matches_full_s` (its training seconds then, None if never) and `matches_full_fraction` (of
    full OPD's training seconds). Nothing is added without a full run to compare with."""
    full = next((r for r in rows if r["run"] == "full"), None)
    if full is None:
        return
    for row in rows:
        hit = first_reaching(read_evals(out / row["run"]), full["final_accuracy"] - MATCH_POINTS)
        row["matches_full_s"] = hit["train_s"] if hit else None
        row["matches_full_fraction"] = hit["train_s"] / full["train_s"] if hit else None


def hidden_share(steps: list[dict]) -> float | None:
    """The share of the run's teacher scoring time hidden behind the student's work: 1 - total wait
    / total scoring time, over the steps whose scoring was timed (None if none was: a vllm teacher
    does not time its forwards). A mean of the steps' shares would weigh a short step as a long one."""
    timed = [s for s in steps if s.get("teacher_compute_s")]
    return hidden_fraction(
        sum(s["teacher_wait_s"] for s in timed), sum(s["teacher_compute_s"] for s in timed)
    )


def print_table(rows: list[dict]) -> None:
    avg_k = next((k for k in rows[0] if k.startswith("avg@")), None) if rows else None
    head = (
        f"{'run':<9} {'schedule':<34} {'acc start':>9} {'acc end':>8} "
        + (f"{avg_k + ' end':>10} " if avg_k else "")
        + f"{'train s':>8} "
        f"{'gen tok':>8} {'teach tok':>9} {'peak MB':>10} {'gen/step':>8} {'wait/step':>9} "
        f"{'upd/step':>8} {'hidden':>7} {'matches full':>13}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['run']:<9} {r['schedule']:<34} {r['initial_accuracy']:>9.1%} "
            f"{r['final_accuracy']:>8.1%} "
            + (f"{r[avg_k]:>10.1%} " if avg_k else "")
            + f"{r['train_s']:>8.1f} {r['tokens_generated']:>8} "
            f"{r['teacher_tokens']:>9} {_peak(r):>10} {r['generate_s']:>8.2f} "
            f"{r['teacher_wait_s']:>9.2f} {r['update_s']:>8.2f} "
            + (f"{r['hidden']:>7.0%}" if r["hidden"] is not None else f"{'-':>7}")
            + f" {_matches_full(r):>13}"
        )
    print(
        "\ntrain s: each run's steps (sampling, waiting on the teacher, updates); evaluations "
        "and model loading left out. gen/wait/upd: seconds a step"
    )
    if any(r.get("peak_gpu_mb") is not None for r in rows):
        print("peak MB: the trainer's resident memory / the GPU memory torch allocated for it")
    full = next((r for r in rows if r["run"] == "full"), None)
    if full and "matches_full_s" in full:
        print(
            f"\nmatches full: when a run first came within {MATCH_POINTS * 100:g} points of full OPD's "
            "final accuracy, in training seconds and as a share of full OPD's"
        )
        if full["initial_accuracy"] >= full["final_accuracy"] - MATCH_POINTS - 1e-9:
            print(
                f"full OPD ended less than {MATCH_POINTS * 100:g} points above its start, so every "
                "run matched it at step 0: here that column says nothing about the schedules"
            )


def _peak(row: dict) -> str:
    """Peak memory in MB: resident, and on a GPU also what torch allocated there ('1931/812')."""
    gpu = row.get("peak_gpu_mb")
    return f"{row['peak_rss_mb']:.0f}" + ("" if gpu is None else f"/{gpu:.0f}")


def _matches_full(row: dict) -> str:
    """When the run came within 2 points of full OPD's final accuracy: '12.3 s (45%)', 'never', or
    '-' without a full run to compare with."""
    if "matches_full_s" not in row:
        return "-"
    if row["matches_full_s"] is None:
        return "never"
    return f"{row['matches_full_s']:.1f} s ({row['matches_full_fraction']:.0%})"
