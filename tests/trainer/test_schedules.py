"""Horizon schedules follow their formulas; bad specs are refused with a clear message."""

from __future__ import annotations

import pytest

from services.trainer.schedules import (
    ScheduleError,
    parse_schedule,
    refuse_ambiguous,
    same_horizons,
    warmup_lr,
)

H_MAX = 256


def horizons(spec: str, steps: int = 40) -> list[int]:
    schedule = parse_schedule(spec, H_MAX)
    return [schedule.horizon(k) for k in range(steps)]


def test_full_is_always_h_max():
    assert set(horizons("full")) == {H_MAX}


@pytest.mark.parametrize(
    "spec, h",
    [
        ("truncated:0.1", 26),
        ("truncated:0.25", 64),
        ("truncated:0.5", 128),
        ("truncated:20", 20),
        (f"truncated:{H_MAX}", H_MAX),
    ],
)
def test_truncated_is_a_fraction_below_one_else_tokens(spec, h):
    assert set(horizons(spec)) == {h}


@pytest.mark.parametrize("h_max, h", [(25, 13), (27, 14), (256, 128)])
def test_half_of_an_odd_h_max_rounds_up_every_time(h_max, h):
    assert parse_schedule("truncated:0.5", h_max).horizon(0) == h


@pytest.mark.parametrize("spec, h_max, h", [("truncated:0.29", 50, 15), ("truncated:0.58", 25, 15)])
def test_an_exact_half_rounds_up_though_floats_land_just_below_it(spec, h_max, h):
    assert parse_schedule(spec, h_max).horizon(0) == h  # 14.5 exactly, 14.4999... in floats


def test_progressive_is_the_papers_step_function():
    got = horizons("progressive:h0=32,dh=64,every=5", 30)
    want = [min(H_MAX, 32 + 64 * (k // 5)) for k in range(30)]
    assert got == want
    assert got[:5] == [32] * 5 and got[5] == 96 and got[-1] == H_MAX


def test_linear_reaches_h_max_at_the_given_step():
    got = horizons("linear:h0=16,steps=10", 15)
    assert got[0] == 16 and got[10:] == [H_MAX] * 5
    assert all(a <= b for a, b in zip(got, got[1:]))
    assert got[5] == 16 + (H_MAX - 16) // 2


@pytest.mark.parametrize("h_max", [100, 200, 225])
def test_linear_is_exact_where_floats_would_round_down(h_max):
    # h0 + (H_max - h0) * k / steps, floored, in exact arithmetic.
    for h0, steps in [(1, 11), (3, 7), (10, 33), (1, 99)]:
        schedule = parse_schedule(f"linear:h0={h0},steps={steps}", h_max)
        got = [schedule.horizon(k) for k in range(steps + 3)]
        assert got == [h0 + (h_max - h0) * min(k, steps) // steps for k in range(steps + 3)]
    assert parse_schedule("linear:h0=1,steps=11", 100).horizon(3) == 28  # floats gave 27


@pytest.mark.parametrize(
    "spec, says",
    [
        ("fullish", "unknown schedule"),
        ("truncated:abc", "not a number"),
        ("truncated:-1", "must be a number > 0"),
        ("progressive:h0=1,dh=2", "missing every"),
        ("progressive:h0=1,dh=2,every=0", "every >= 1"),
        ("linear:h0=x,steps=3", "not an integer"),
        ("linear:start=1,steps=3", "bad parameter"),
        ("progressive:h0=4,dh=4,every=2,every=3", "every is given twice"),
        # Horizons the schedule could only cut or round without a word.
        (f"truncated:{H_MAX + 1}", "beyond H_max"),
        ("truncated:2.5", "a whole number"),
        (f"progressive:h0={H_MAX + 1},dh=1,every=1", "beyond H_max"),
        (f"linear:h0={H_MAX + 1},steps=3", "beyond H_max"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, says):
    with pytest.raises(ScheduleError, match=says):
        parse_schedule(spec, H_MAX)


@pytest.mark.parametrize(
    "spec",
    [
        "full",
        "truncated:0.1",
        "truncated:40",
        "progressive:h0=8,dh=16,every=3",
        "linear:h0=4,steps=50",
    ],
)
def test_horizons_never_shrink(spec):
    # The trainer checks a teacher's max_seq_len against the last step's horizon alone.
    schedule = parse_schedule(spec, 256)
    horizons = [schedule.horizon(k) for k in range(200)]
    assert horizons == sorted(horizons) and max(horizons) <= 256


SPECS = [
    "full",
    "truncated:0.5",
    "truncated:128",
    "progressive:h0=8,dh=16,every=3",
    "progressive:h0=8,dh=0,every=3",
    "progressive:h0=250,dh=16,every=5",
    "linear:h0=4,steps=50",
    "linear:h0=4,steps=1",
]


@pytest.mark.parametrize("spec", SPECS + ["linear:h0=3,steps=700", "progressive:h0=1,dh=3,every=7"])
def test_change_steps_are_exactly_where_the_horizon_changes(spec):
    schedule = parse_schedule(spec, H_MAX)
    h = [schedule.horizon(k) for k in range(2000)]
    assert schedule.change_steps() == [0] + [k for k in range(1, 2000) if h[k] != h[k - 1]]


@pytest.mark.parametrize("a", SPECS)
@pytest.mark.parametrize("b", SPECS)
def test_same_horizons_agrees_with_comparing_every_step(a, b):
    sa, sb = parse_schedule(a, H_MAX), parse_schedule(b, H_MAX)
    for steps in (1, 7, 60, 400):
        every_step = all(sa.horizon(k) == sb.horizon(k) for k in range(steps))
        assert same_horizons(sa, sb, steps) == every_step, (a, b, steps)


@pytest.mark.parametrize(
    "spec",
    [
        "progressive:h0=8,dh=16,every=3",
        "linear:h0=1,steps=1000000",
        "progressive:h0=1,dh=1,every=10000000",
    ],
)
def test_same_horizons_compares_few_steps_however_many_a_run_has(spec):
    # Counted, not timed: the resume check compares a run's steps on the API's event loop.
    schedule = parse_schedule(spec, H_MAX)
    calls = []

    class Counting(type(schedule)):
        def horizon(self, step):
            calls.append(step)
            return super().horizon(step)

    counting = Counting(**vars(schedule))
    assert same_horizons(counting, counting, 10**9)
    assert len(calls) <= 2 * (H_MAX + 1)


def test_warmup_lr_rises_linearly_then_holds():
    assert [warmup_lr(k, 1e-3, 4) for k in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    )
    assert warmup_lr(0, 1e-3, 0) == warmup_lr(0, 1e-3, 1) == 1e-3  # no warmup


@pytest.mark.parametrize("spec", ["truncated:1.0", "truncated:1e0", " truncated:1.00"])
def test_a_ratio_written_as_one_is_refused_as_ambiguous_where_a_user_gives_it(spec):
    with pytest.raises(ScheduleError, match="write full for the whole horizon"):
        refuse_ambiguous(spec)
    # A checkpoint's saved spec keeps its meaning (1 token), so it still parses.
    assert parse_schedule(spec, H_MAX).horizon(0) == 1
    refuse_ambiguous("truncated:1")
    refuse_ambiguous("truncated:0.5")
