"""What a run leaves in its folder, and the plots that compare runs.

metrics.jsonl   one line per step        eval.jsonl   one line per evaluation
summary.json    the run's totals         accuracy.png eval accuracy vs steps, wall-clock, teacher tokens

opd-trainer plot runs/demo/full runs/demo/topd-10 --out runs/demo/comparison.png
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def hidden_fraction(wait_s: float, compute_s: float) -> float | None:
    """The share of the teacher's scoring time (`compute_s`) the student did not spend waiting for
    it (`wait_s`); None when the scoring was not timed (a vllm teacher does not time its forwards)."""
    return max(0.0, 1 - wait_s / compute_s) if compute_s > 0 else None


class JsonlLog:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped so that no
    step is ever recorded twice."""

    def __init__(self, path: Path, keep_through_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_through_step is None:
            path.write_text("")
        elif path.exists():
            records = read_jsonl(path, torn_tail_ok=True)
            try:
                kept = [line for line in records if line["step"] <= keep_through_step]
            except (KeyError, TypeError):
                raise ValueError(f"{path}: a line without a step number") from None
            path.write_text("".join(json.dumps(line) + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path, torn_tail_ok: bool = False) -> list[dict]:
    """The records of a JSON-lines file ([] when there is none); ValueError naming a bad line.
    `torn_tail_ok` drops a bad last line, as a run killed in the middle of writing it leaves."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if torn_tail_ok and number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not JSON") from None
    return records


EVAL_FIELDS = ("step", "accuracy", "train_s", "teacher_tokens")


def read_evals(run: Path) -> list[dict]:
    """A run's evaluations (its eval.jsonl); ValueError naming the file when a record lacks what
    the plots need."""
    path = Path(run) / "eval.jsonl"
    evals = read_jsonl(path)
    for number, record in enumerate(evals, 1):
        if not isinstance(record, dict) or not all(_is_number(record.get(k)) for k in EVAL_FIELDS):
            raise ValueError(
                f"{path}: record {number} is not an evaluation (needs numbers {EVAL_FIELDS})"
            )
    return evals


def first_reaching(evals: list[dict], accuracy: float) -> dict | None:
    """The first evaluation at `accuracy` or better; None when no evaluation gets there."""
    # Accuracies are fractions of the problems evaluated, so the tolerance is for float rounding.
    return next((e for e in evals if e["accuracy"] >= accuracy - 1e-9), None)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name; where two runs share a name (seed0/full, seed1/full), every run's
    path below the folder they all sit in, so the legend tells them apart."""
    names = [Path(r).name for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    paths = [Path(r).resolve() for r in run_dirs]
    common = Path(os.path.commonpath(paths))
    return [str(p.relative_to(common)) if p != common else p.name for p in paths]


def plot_runs(run_dirs: list[Path], out_png: Path, title: str = "") -> Path:
    """Eval accuracy against steps, training wall-clock and teacher tokens; one line per run."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for run, label in zip(run_dirs, run_labels(run_dirs)):
        evals = read_evals(run)
        if not evals:
            continue
        acc = [100 * e["accuracy"] for e in evals]
        axes[0].plot([e["step"] for e in evals], acc, marker="o", label=label)
        axes[1].plot([e["train_s"] for e in evals], acc, marker="o", label=label)
        axes[2].plot([e["teacher_tokens"] / 1e3 for e in evals], acc, marker="o", label=label)
    xlabels = ("step", "training wall-clock (s), evaluations left out", "teacher tokens scored (k)")
    for ax, xlabel in zip(axes, xlabels):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 0.5 in a short run
    axes[0].set_ylabel("held-out accuracy, greedy (%)")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
