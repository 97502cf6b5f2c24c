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
            # A ratio below 1 is a fraction of H_max; 1 or more is a token count.
            h = self.ratio * self.h_max if self.ratio < 1 else self.ratio
            # Halves round up (Python's round() takes them to the even number: 12.5 -> 12).
            return max(1, min(self.h_max, math.floor(h + 0.5)))
        if self.kind == "progressive":
            # Step-wise growth, as in the POPD paper: flat for `every` steps, then +dh.
            return min(self.h_max, self.h0 + self.dh * (step // self.every))
        # linear: straight line from h0 at step 0 to h_max at `steps`, flat after.
        frac = min(1.0, step / self.steps)
        return min(self.h_max, int(math.floor(self.h0 + (self.h_max - self.h0) * frac)))


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
