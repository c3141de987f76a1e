"""The trace bus: every layer reports what it does here, as structured events on the modeled clock.

Hot paths guard their calls with ``if trace.enabled:`` so that, with no sink attached, tracing costs
one attribute load and a branch (DESIGN.md rule 9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

Sink = Callable[["TraceEvent"], None]
AnySink = TypeVar("AnySink", bound=Sink)


def _zero_clock() -> int:
    return 0


@dataclass(frozen=True, slots=True, init=False)
class TraceEvent:
    """One thing that happened.

    ``seq`` is the order in which the bus delivered the event; ``time_ns`` is modeled time (for a
    span, its start); ``dur_ns`` is set only for spans.
    """

    seq: int
    time_ns: int
    component: str
    kind: str
    fields: dict[str, Any]
    dur_ns: int | None = None

    def __init__(
        self,
        seq: int,
        time_ns: int,
        component: str,
        kind: str,
        fields: dict[str, Any],
        dur_ns: int | None = None,
    ) -> None:
        # Writing the slots directly: the generated frozen __init__ costs ~60% more per event.
        _set_seq(self, seq)
        _set_time_ns(self, time_ns)
        _set_component(self, component)
        _set_kind(self, kind)
        _set_fields(self, fields)
        _set_dur_ns(self, dur_ns)


_set_seq, _set_time_ns, _set_component, _set_kind, _set_fields, _set_dur_ns = (
    vars(TraceEvent)[name].__set__ for name in ("seq", "time_ns", "component", "kind", "fields", "dur_ns")
)


class TraceBus:
    """Delivers events to the attached sinks, stamped with a sequence number and the modeled time."""

    def __init__(
        self, clock_ns: Callable[[], int] = _zero_clock, metadata: dict[str, Any] | None = None
    ) -> None:
        self.enabled = False
        # Run metadata (design, policy, boot variant, seed, platform...) that exports record.
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._clock_ns = clock_ns
        # A tuple, replaced on attach/detach, so a sink may detach itself while an event is delivered.
        self._sinks: tuple[Sink, ...] = ()
        self._next_seq = 0

    @property
    def sinks(self) -> tuple[Sink, ...]:
        return self._sinks

    def attach(self, sink: AnySink) -> AnySink:
        """Start delivering events to ``sink``; returns it so callers can attach and keep in one line."""
        if any(existing is sink for existing in self._sinks):
            raise ValueError(f"sink {sink!r} is already attached")
        self._sinks = (*self._sinks, sink)
        self.enabled = True
        return sink

    def detach(self, sink: Sink) -> None:
        remaining = tuple(existing for existing in self._sinks if existing is not sink)
        if len(remaining) == len(self._sinks):
            raise ValueError(f"sink {sink!r} is not attached")
        self._sinks = remaining
        self.enabled = bool(remaining)

    def emit(self, component: str, kind: str, /, **fields: Any) -> TraceEvent | None:
        """Deliver one instant event; returns it, or None when no sink is attached."""
        if not self.enabled:
            return None
        return self._deliver(component, kind, fields, self._clock_ns(), None)

    def span(self, component: str, kind: str, /, **fields: Any) -> Span:
        """A context manager that emits one event covering its body, timed on the modeled clock.

        The body may add result fields to the dict it is given (``with bus.span(...) as f: f["n"] = 3``).
        The event is delivered when the span ends, so its ``seq`` follows events emitted inside it.
        """
        return Span(self, component, kind, fields)

    def _deliver(
        self, component: str, kind: str, fields: dict[str, Any], time_ns: int, dur_ns: int | None
    ) -> TraceEvent:
        event = TraceEvent(self._next_seq, time_ns, component, kind, fields, dur_ns)
        self._next_seq += 1
        for sink in self._sinks:
            sink(event)
        return event


class Span:
    """See ``TraceBus.span``. Records nothing if the bus had no sink when the span began."""

    __slots__ = ("_bus", "_component", "_fields", "_kind", "_start_ns")

    def __init__(self, bus: TraceBus, component: str, kind: str, fields: dict[str, Any]) -> None:
        self._bus = bus
        self._component = component
        self._kind = kind
        self._fields = fields
        self._start_ns: int | None = None

    def __enter__(self) -> dict[str, Any]:
        if self._bus.enabled:
            self._start_ns = self._bus._clock_ns()
        return self._fields

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        start_ns = self._start_ns
        if start_ns is None or not self._bus.enabled:
            return
        if exc_type is not None:
            self._fields.setdefault("exception", exc_type.__name__)
        end_ns = self._bus._clock_ns()
        self._bus._deliver(self._component, self._kind, self._fields, start_ns, end_ns - start_ns)
