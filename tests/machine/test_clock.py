"""Clock: modeled time, timers in deterministic order, cancellation, and polling with a timeout."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm_smmu.machine.clock import Clock


def test_time_starts_at_zero_and_only_moves_forward() -> None:
    clock = Clock()
    assert (clock.now_ns, clock.now_us) == (0, 0)
    clock.advance(1_500)
    assert (clock.now_ns, clock.now_us) == (1_500, 1.5)
    clock.advance(-100)
    clock.advance_to(1_000)
    assert clock.now_ns == 1_500


def test_timers_fire_in_time_order_at_their_own_time() -> None:
    clock = Clock()
    fired: list[tuple[str, int]] = []
    clock.call_at(300, lambda: fired.append(("c", clock.now_ns)))
    clock.call_at(100, lambda: fired.append(("a", clock.now_ns)))
    clock.call_after(200, lambda: fired.append(("b", clock.now_ns)))
    clock.advance(250)
    assert fired == [("a", 100), ("b", 200)]
    assert clock.now_ns == 250
    clock.advance(1_000)
    assert fired[-1] == ("c", 300)
    assert clock.now_ns == 1_250


def test_timers_due_at_the_same_time_fire_in_scheduling_order() -> None:
    clock = Clock()
    fired: list[int] = []
    for index in range(20):
        clock.call_at(500, partial(fired.append, index))
    clock.advance_to(500)
    assert fired == list(range(20))


def test_a_timer_at_the_target_time_fires() -> None:
    clock = Clock()
    fired: list[int] = []
    clock.call_at(1_000, lambda: fired.append(clock.now_ns))
    clock.advance_to(999)
    assert fired == []
    clock.advance_to(1_000)
    assert fired == [1_000]


def test_timer_in_the_past_fires_now_on_the_next_advance() -> None:
    clock = Clock()
    clock.advance(1_000)
    fired: list[int] = []
    clock.call_at(10, lambda: fired.append(clock.now_ns))
    clock.call_after(-5, lambda: fired.append(clock.now_ns))
    assert clock.next_deadline() == 1_000
    clock.advance(0)
    assert fired == [1_000, 1_000]


def test_a_timer_scheduled_by_a_callback_fires_within_the_same_advance() -> None:
    clock = Clock()
    fired: list[tuple[str, int]] = []

    def first() -> None:
        fired.append(("first", clock.now_ns))
        clock.call_after(50, lambda: fired.append(("second", clock.now_ns)))

    clock.call_at(100, first)
    clock.advance_to(200)
    assert fired == [("first", 100), ("second", 150)]


def test_cancelled_timer_never_fires_and_leaves_the_deadline() -> None:
    clock = Clock()
    fired: list[str] = []
    early = clock.call_at(100, lambda: fired.append("early"))
    clock.call_at(200, lambda: fired.append("late"))
    assert clock.next_deadline() == 100
    Clock.cancel(early)
    assert clock.next_deadline() == 200
    clock.advance(1_000)
    assert fired == ["late"]
    assert clock.next_deadline() is None


def test_poll_returns_true_at_once_when_the_condition_already_holds() -> None:
    clock = Clock()
    assert clock.poll(lambda: True, timeout_us=10) is True
    assert clock.now_ns == 0


def test_poll_times_out_exactly_at_the_deadline() -> None:
    clock = Clock()
    clock.advance(123)
    calls: list[int] = []

    def never() -> bool:
        calls.append(clock.now_ns)
        return False

    clock.call_at(1_500, lambda: None)  # something may have changed: the poll after it happens
    assert clock.poll(never, timeout_us=2.5) is False
    assert clock.now_ns == 123 + 2_500
    # the poll at 1_123 could only see what the one at 123 saw; the last check is at the deadline
    assert calls == [123, 2_123, 2_623]


@pytest.mark.parametrize("timeout_us", [1.001, 4.35, 0.3, 1.1])
def test_poll_deadline_is_not_cut_short_by_float_rounding(timeout_us: float) -> None:
    clock = Clock()
    assert clock.poll(lambda: False, timeout_us=timeout_us, step_ns=1) is False
    assert clock.now_ns == round(timeout_us * 1000)


def test_poll_with_zero_timeout_checks_once_and_keeps_time() -> None:
    clock = Clock()
    assert clock.poll(lambda: False, timeout_us=0) is False
    assert clock.now_ns == 0


def test_poll_sees_a_condition_set_by_a_timer_at_the_next_step() -> None:
    clock = Clock()
    done: list[bool] = []
    clock.call_at(2_500, lambda: done.append(True))
    assert clock.poll(lambda: bool(done), timeout_us=100, step_ns=1_000) is True
    assert clock.now_ns == 3_000


def test_poll_succeeds_when_the_condition_turns_true_exactly_at_the_deadline() -> None:
    clock = Clock()
    clock.call_at(5_000, lambda: None)
    assert clock.poll(lambda: clock.now_ns >= 5_000, timeout_us=5) is True
    assert clock.now_ns == 5_000


def test_poll_rejects_a_step_that_would_never_advance_time() -> None:
    clock = Clock()
    with pytest.raises(ValueError, match="step_ns"):
        clock.poll(lambda: False, timeout_us=1, step_ns=0)


# -- poll_backoff: the polls of a backing-off loop, minus the ones nothing could change ------------


def _naive_backoff(clock: Clock, condition: Callable[[], bool], deadline: int, first: int, most: int) -> bool:
    """The loop ``poll_backoff`` stands for, polling at every step."""
    step = first
    while True:
        if condition():
            return True
        if clock.now_ns >= deadline:
            return False
        clock.advance(min(step, deadline - clock.now_ns))
        step = min(step * 2, most)


def _timed_world(clock: Clock, timer_times: list[int], needed: int, polls: list[int]) -> Callable[[], bool]:
    """Timers each bump a counter (some reschedule themselves); the condition holds once the
    counter reaches ``needed``, and every evaluation records when it ran."""
    state = {"count": 0}

    def bump(again: int) -> None:
        state["count"] += 1
        if again:
            clock.call_after(again, lambda: bump(0))

    for index, when in enumerate(timer_times):
        clock.call_at(when, partial(bump, 700 if index % 3 == 0 else 0))

    def condition() -> bool:
        polls.append(clock.now_ns)
        return state["count"] >= needed

    return condition


@settings(max_examples=300, deadline=None)
@given(
    timer_times=st.lists(st.integers(0, 2_000_000), max_size=12),
    needed=st.integers(0, 14),
    timeout_ns=st.integers(0, 1_500_000),
    first=st.integers(1, 5_000),
    growth=st.integers(0, 8),
    start=st.integers(0, 100_000),
)
def test_poll_backoff_returns_what_and_when_the_polling_loop_does(
    timer_times: list[int], needed: int, timeout_ns: int, first: int, growth: int, start: int
) -> None:
    most = first << growth
    outcomes = []
    for skipping in (False, True):
        clock = Clock()
        clock.advance(start)
        polls: list[int] = []
        condition = _timed_world(clock, timer_times, needed, polls)
        deadline = start + timeout_ns
        if skipping:
            result = clock.poll_backoff(condition, deadline, first, most)
        else:
            result = _naive_backoff(clock, condition, deadline, first, most)
        outcomes.append((result, clock.now_ns, polls[-1]))
    assert outcomes[0] == outcomes[1]


def test_poll_backoff_skips_the_polls_between_timers() -> None:
    clock = Clock()
    clock.call_at(900_000, lambda: None)
    polls: list[int] = []

    def never() -> bool:
        polls.append(clock.now_ns)
        return False

    assert clock.poll_backoff(never, 1_000_000, 50, 64_000) is False
    # one poll at the start, one after the timer (on the loop's 64 us grid), one at the deadline
    assert len(polls) == 3
    assert polls[0] == 0 and polls[-1] == 1_000_000
    assert 900_000 <= polls[1] < 900_000 + 64_000
