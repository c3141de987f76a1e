"""TraceBus: sinks, the enabled flag, sequence numbers, modeled time and spans."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest

from pkvm_smmu.trace import RecordingSink, TraceBus, TraceEvent


class FakeClock:
    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns


def test_enabled_flips_with_sinks() -> None:
    bus = TraceBus()
    assert bus.enabled is False
    first, second = RecordingSink(), RecordingSink()
    bus.attach(first)
    assert bus.enabled is True
    bus.attach(second)
    bus.detach(first)
    assert bus.enabled is True
    bus.detach(second)
    assert bus.enabled is False


def test_emit_without_sink_does_nothing_and_consumes_no_sequence_number() -> None:
    bus = TraceBus()
    assert bus.emit("smmu0", "walk", level=3) is None
    sink = bus.attach(RecordingSink())
    bus.emit("smmu0", "walk", level=3)
    assert [event.seq for event in sink] == [0]


def test_every_sink_receives_each_event_and_detached_sinks_receive_no_more() -> None:
    bus = TraceBus()
    first, second = bus.attach(RecordingSink()), bus.attach(RecordingSink())
    bus.emit("hyp", "trap", offset=0x98)
    bus.detach(first)
    bus.emit("hyp", "trap", offset=0x9C)
    assert [e.fields["offset"] for e in first] == [0x98]
    assert [e.fields["offset"] for e in second] == [0x98, 0x9C]


def test_emitted_event_carries_component_kind_and_fields() -> None:
    bus = TraceBus()
    sink = bus.attach(RecordingSink())
    returned = bus.emit("host.arm-smmu-v3", "probe", result="defer", attempt=2)
    assert sink.events == [TraceEvent(0, 0, "host.arm-smmu-v3", "probe", {"result": "defer", "attempt": 2})]
    assert returned is sink.events[0]


def test_fields_may_be_named_component_or_kind() -> None:
    bus = TraceBus()
    sink = bus.attach(RecordingSink())
    bus.emit("host", "probe", component="smmu", kind="platform")
    assert sink.events[0].component == "host"
    assert sink.events[0].fields == {"component": "smmu", "kind": "platform"}


def test_sequence_numbers_follow_emission_order_across_components() -> None:
    bus = TraceBus()
    sink = bus.attach(RecordingSink())
    for component in ["smmu0", "hyp", "smmu0", "host"]:
        bus.emit(component, "x")
    assert [e.seq for e in sink] == [0, 1, 2, 3]
    assert [e.component for e in sink] == ["smmu0", "hyp", "smmu0", "host"]


def test_time_comes_from_the_supplied_clock() -> None:
    clock = FakeClock()
    bus = TraceBus(clock_ns=clock)
    sink = bus.attach(RecordingSink())
    clock.now_ns = 1_500
    bus.emit("smmu0", "cmd.consume")
    clock.now_ns = 7_000
    bus.emit("smmu0", "cmd.consume")
    assert [e.time_ns for e in sink] == [1_500, 7_000]
    assert all(e.dur_ns is None for e in sink)


def test_span_measures_modeled_time_and_starts_at_entry() -> None:
    clock = FakeClock()
    bus = TraceBus(clock_ns=clock)
    sink = bus.attach(RecordingSink())
    clock.now_ns = 100
    with bus.span("hyp", "trap", offset=0x98) as fields:
        clock.now_ns = 2_600
        fields["handled"] = True
    (event,) = sink.events
    assert (event.time_ns, event.dur_ns) == (100, 2_500)
    assert event.fields == {"offset": 0x98, "handled": True}


def test_span_is_delivered_after_the_events_inside_it() -> None:
    clock = FakeClock()
    bus = TraceBus(clock_ns=clock)
    sink = bus.attach(RecordingSink())
    with bus.span("hyp", "trap"):
        clock.now_ns = 10
        bus.emit("smmu0", "cmd.consume")
    assert [(e.kind, e.seq) for e in sink] == [("cmd.consume", 0), ("trap", 1)]


def test_span_records_an_exception_and_lets_it_propagate() -> None:
    bus = TraceBus()
    sink = bus.attach(RecordingSink())
    with pytest.raises(KeyError), bus.span("hyp", "hvc"):
        raise KeyError("x")
    assert sink.events[0].fields == {"exception": "KeyError"}


def test_span_started_without_a_sink_records_nothing() -> None:
    bus = TraceBus()
    span = bus.span("hyp", "trap")
    with span:
        sink = bus.attach(RecordingSink())
    assert len(sink) == 0


def test_attaching_twice_or_detaching_a_stranger_is_an_error() -> None:
    bus = TraceBus()
    sink = bus.attach(RecordingSink())
    with pytest.raises(ValueError, match="already attached"):
        bus.attach(sink)
    with pytest.raises(ValueError, match="not attached"):
        bus.detach(RecordingSink())
    assert bus.enabled is True


def test_a_sink_may_detach_itself_while_receiving_an_event() -> None:
    bus = TraceBus()
    later = RecordingSink()

    def once(event: TraceEvent) -> None:
        bus.detach(once)

    bus.attach(once)
    bus.attach(later)
    bus.emit("a", "x")
    bus.emit("a", "y")
    assert [e.kind for e in later] == ["x", "y"]
    assert bus.sinks == (later,)


def test_events_are_frozen_slotted_values() -> None:
    event = TraceEvent(3, 40, "smmu0", "walk", {"level": 2})
    assert event == TraceEvent(seq=3, time_ns=40, component="smmu0", kind="walk", fields={"level": 2})
    assert event != TraceEvent(3, 40, "smmu0", "walk", {"level": 2}, dur_ns=0)
    assert event.dur_ns is None
    assert not hasattr(event, "__dict__")
    with pytest.raises(FrozenInstanceError):
        event.seq = 4


def test_metadata_is_a_copy_of_what_was_given() -> None:
    given = {"design": "trap-emulate", "seed": 7}
    bus = TraceBus(metadata=given)
    bus.metadata["policy"] = "v4"
    assert given == {"design": "trap-emulate", "seed": 7}
    assert bus.metadata == {"design": "trap-emulate", "seed": 7, "policy": "v4"}
