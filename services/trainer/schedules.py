"""Rollout-horizon schedules: H_k, the most completion tokens a rollout may have at step k.

    full                            H_k = H_max                                   (full OPD)
    truncated:R                     H_k = R * H_max if R < 1, else R tokens       (TOPD)
    progressive:h0=A,dh=B,every=C   H_k = min(H_max, A + B * floor(k / C))        (POPD, step-wise)
    linear:h0=A,steps=C             H_k grows linearly from A to H_max by step C

Each schedule is a pure function of the step, so a resumed run picks up the same horizon. The
learning rate's warmup lives here too (`warmup_lr`), for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """The learning rate at `step` (0-based): linear warmup to `lr` over `warmup_steps` steps (the
    first step takes lr / warmup_steps), then constant."""
    return lr * min(1.0, (step + 1) / max(1, warmup_steps))


class ScheduleError(ValueError):
    """A schedule spec that cannot be parsed; the message says what is expected."""


@dataclass(frozen=True)
class Schedule:
    kind: str  # full | truncated | progressive | linear
    h_max: int
    ratio: float = 1.0  # truncated
    h0: int = 0  # progressive, linear
    dh: int = 0  # progressive
    every: int = 1  # progressive: steps between increments
    steps: int = 1  # linear: step at which H reaches h_max

    def horizon(self, step: int) -> int:
        if self.kind == "full":
            return self.h_max
        if self.kind == "truncated":
            # A ratio below 1 is a fraction of H_max; 1 or more is a token count. Exact arithmetic:
            # in floats 0.29 x 50 is just under 14.5. Halves round up (round() would take 12.5
            # to the even 12).
            exact = Fraction(str(self.ratio))
            h = exact * self.h_max if self.ratio < 1 else exact
            return max(1, min(self.h_max, math.floor(h + Fraction(1, 2))))
        if self.kind == "progressive":
            # Step-wise growth, as in the POPD paper: flat for `every` steps, then +dh.
            return min(self.h_max, self.h0 + self.dh * (step // self.every))
        # linear: straight line from h0 at step 0 to h_max at `steps`, flat after; in integers,
        # since in floats 3 / 11 x 99 is just under 27.
        grown = (self.h_max - self.h0) * min(step, self.steps) // self.steps
        return min(self.h_max, self.h0 + grown)

    def change_steps(self) -> list[int]:
        """Step 0 and every step whose horizon differs from the step before's (at most H_max of
        them, however many steps the schedule spans)."""
        if self.kind == "progressive" and self.dh > 0:
            increments = -(-max(0, self.h_max - self.h0) // self.dh)  # ceil
            return [j * self.every for j in range(increments + 1)]
        if self.kind == "linear" and self.h_max > self.h0:
            # The first step at or above each horizon v: h0 + floor(span * k / steps) >= v.
            span = self.h_max - self.h0
            firsts = {
                -(-(v - self.h0) * self.steps // span) for v in range(self.h0 + 1, self.h_max + 1)
            }
            return sorted({0} | firsts)
        return [0]


def same_horizons(a: Schedule, b: Schedule, steps: int) -> bool:
    """`a` and `b` give every step in [0, steps) the same horizon. Both are constant between their
    change steps, so those are the only steps compared: a billion steps cost no more than a few."""
    compared = sorted(set(a.change_steps()) | set(b.change_steps()))
    return all(a.horizon(k) == b.horizon(k) for k in compared if k < steps)


_SPEC_HELP = (
    "expected one of: full | truncated:R | progressive:h0=A,dh=B,every=C | linear:h0=A,steps=C"
)


def parse_schedule(spec: str, h_max: int) -> Schedule:
    """Parse a spec such as 'truncated:0.1' or 'progressive:h0=32,dh=32,every=10'."""
    kind, _, args = spec.strip().partition(":")
    if kind == "full" and not args:
        return Schedule("full", h_max)
    if kind == "truncated":
        ratio = _number(args, spec)
        if not math.isfinite(ratio) or ratio <= 0:
            raise ScheduleError(f"schedule {spec!r}: R must be a number > 0")
        if ratio >= 1 and not ratio.is_integer():
            raise ScheduleError(f"schedule {spec!r}: R >= 1 is a token count, so a whole number")
        _within(ratio, h_max, spec, "R")
        return Schedule("truncated", h_max, ratio=ratio)
    if kind == "progressive":
        p = _params(args, spec, {"h0", "dh", "every"})
        if p["h0"] < 1 or p["dh"] < 0 or p["every"] < 1:
            raise ScheduleError(f"schedule {spec!r}: need h0 >= 1, dh >= 0, every >= 1")
        _within(p["h0"], h_max, spec, "h0")
        return Schedule("progressive", h_max, h0=p["h0"], dh=p["dh"], every=p["every"])
    if kind == "linear":
        p = _params(args, spec, {"h0", "steps"})
        if p["h0"] < 1 or p["steps"] < 1:
            raise ScheduleError(f"schedule {spec!r}: need h0 >= 1, steps >= 1")
        _within(p["h0"], h_max, spec, "h0")
        return Schedule("linear", h_max, h0=p["h0"], steps=p["steps"])
    raise ScheduleError(f"unknown schedule {spec!r}: {_SPEC_HELP}")


def refuse_ambiguous(spec: str) -> None:
    """A spec a user may well have meant otherwise: `truncated:1.0` is 1 token, not all of H_max.
    Checked on what a user gives, not on a checkpoint's saved spec, which keeps its meaning."""
    kind, _, args = spec.strip().partition(":")
    try:
        one = kind == "truncated" and float(args) == 1 and args.strip() != "1"
    except ValueError:
        return
    if one:
        raise ScheduleError(
            f"schedule {spec!r}: R >= 1 is a token count, so this is a horizon of 1 token; "
            "write full for the whole horizon, or truncated:1 for one token"
        )


def _within(tokens: float, h_max: int, spec: str, name: str) -> None:
    """A horizon in tokens beyond H_max would be cut to it without a word: refuse it instead."""
    if tokens > h_max:
        raise ScheduleError(
            f"schedule {spec!r}: {name} = {tokens:g} tokens is beyond H_max = {h_max} "
            "(--max-new-tokens)"
        )


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ScheduleError(f"schedule {spec!r}: {text!r} is not a number; {_SPEC_HELP}") from None


def _params(text: str, spec: str, names: set[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in names:
            raise ScheduleError(f"schedule {spec!r}: bad parameter {part!r}; {_SPEC_HELP}")
        if key.strip() in out:
            raise ScheduleError(f"schedule {spec!r}: {key.strip()} is given twice")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise ScheduleError(f"schedule {spec!r}: {key}={value!r} is not an integer") from None
    missing = names - out.keys()
    if missing:
        raise ScheduleError(
            f"schedule {spec!r}: missing {', '.join(sorted(missing))}; {_SPEC_HELP}"
        )
    return out
