"""The modeled clock: time is a count of nanoseconds advanced by the model, never the host's wall clock."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(order=True)
class _Timer:
    when_ns: int
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class Clock:
    """Modeled time with deterministic timers (ties are broken by scheduling order)."""

    def __init__(self) -> None:
        self._now_ns = 0
        self._seq = 0
        self._timers: list[_Timer] = []
        self._fired = 0

    @property
    def now_ns(self) -> int:
        return self._now_ns

    @property
    def now_us(self) -> float:
        return self._now_ns / 1000

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> _Timer:
        self._seq += 1
        timer = _Timer(max(when_ns, self._now_ns), self._seq, callback)
        heapq.heappush(self._timers, timer)
        return timer

    def call_after(self, delay_ns: int, callback: Callable[[], None]) -> _Timer:
        return self.call_at(self._now_ns + max(0, delay_ns), callback)

    @staticmethod
    def cancel(timer: _Timer) -> None:
        timer.cancelled = True

    def next_deadline(self) -> int | None:
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0].when_ns if self._timers else None

    def advance(self, delta_ns: int) -> None:
        """Move time forward, firing every timer that falls due, in order."""
        self.advance_to(self._now_ns + max(0, delta_ns))

    def advance_to(self, target_ns: int) -> None:
        while self._timers and self._timers[0].when_ns <= target_ns:
            timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now_ns = max(self._now_ns, timer.when_ns)
            self._fired += 1
            timer.callback()
        self._now_ns = max(self._now_ns, target_ns)

    def poll(self, condition: Callable[[], bool], timeout_us: float, step_ns: int = 1000) -> bool:
        """Advance time in ``step_ns`` steps until ``condition()`` holds or ``timeout_us`` passes.

        This is how software models a polling loop with a timeout (e.g. waiting for CR0ACK).
        """
        if step_ns <= 0:
            raise ValueError(f"poll: step_ns must be positive, got {step_ns}")
        # round, not int: 1.001 * 1000 is 1000.9999999999999 and would end the wait early
        deadline = self._now_ns + round(timeout_us * 1000)
        return self.poll_backoff(condition, deadline, step_ns, step_ns)

    def poll_backoff(
        self, condition: Callable[[], bool], deadline_ns: int, first_step_ns: int, max_step_ns: int
    ) -> bool:
        """A polling loop: ``condition()`` is true at some poll before ``deadline_ns``, or it timed out.

        The polls fall where a loop sleeping ``first_step_ns``, then twice as long each time up to
        ``max_step_ns``, puts them, and the result and the time it returns at are that loop's. Polls
        between two timers are skipped: between polls only timers change the machine, so a poll
        with no timer fired since the previous one would read what that one read.
        """
        step = first_step_ns
        while True:
            fired = self._fired
            if condition():
                return True
            now = self._now_ns
            if now >= deadline_ns:
                return False
            if self._fired != fired:  # the condition itself moved time: poll again after one step
                self.advance_to(min(now + step, deadline_ns))
                step = min(step * 2, max_step_ns)
                continue
            upcoming = self.next_deadline()
            target = min(now + step, deadline_ns)
            step = min(step * 2, max_step_ns)
            while target < deadline_ns and (upcoming is None or upcoming > target):
                if step == max_step_ns and upcoming is not None:
                    # constant steps: jump straight to the first poll at or after the timer
                    skipped = (min(upcoming, deadline_ns) - target + step - 1) // step
                    target = min(target + skipped * step, deadline_ns)
                    break
                if step == max_step_ns:
                    target = deadline_ns
                    break
                target = min(target + step, deadline_ns)
                step = min(step * 2, max_step_ns)
            self.advance_to(target)
