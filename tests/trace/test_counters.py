"""Counters: per (component, kind), family totals, per-field values, snapshots and deltas."""

from __future__ import annotations

import pytest

from pkvm_smmu.trace import Counters, TraceBus, kind_matches


def counted_bus(*by_fields: str) -> tuple[TraceBus, Counters]:
    bus = TraceBus()
    return bus, bus.attach(Counters(by_fields))


def test_counts_per_component_and_kind() -> None:
    bus, counters = counted_bus()
    bus.emit("smmu0", "walk")
    bus.emit("smmu0", "walk")
    bus.emit("smmu1", "walk")
    bus.emit("smmu0", "fault")
    assert counters.get("smmu0", "walk") == 2
    assert counters.get("smmu1", "walk") == 1
    assert counters.get("smmu0", "fault") == 1
    assert counters.get("smmu1", "fault") == 0


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("cmd.", 5), ("cmd", 5), ("cmd.sync", 3), ("cmd.sync.", 3), ("cmd.cfgi", 0), ("walk", 1), ("cm", 0)],
)
def test_total_sums_over_components_by_exact_kind_or_family(pattern: str, expected: int) -> None:
    bus, counters = counted_bus()
    for component, kind in [
        ("smmu0", "cmd.consume"),
        ("smmu0", "cmd.sync"),
        ("smmu1", "cmd.sync"),
        ("hyp", "cmd.sync.timeout"),
        ("hyp", "cmd"),
        ("smmu0", "walk"),
        ("smmu0", "cmdq"),  # shares a prefix with "cmd" but is not in its family
    ]:
        bus.emit(component, kind)
    assert counters.total(pattern) == expected


def test_kind_matches_respects_dotted_boundaries() -> None:
    assert kind_matches("cmd.sync", "cmd.")
    assert not kind_matches("cmdq.prod", "cmd")
    assert not kind_matches("cmd", "cmd.sync")


def test_by_field_counts_values_of_configured_fields_only() -> None:
    bus, counters = counted_bus("opcode")
    bus.emit("smmu0", "cmd.consume", opcode="CMD_SYNC", index=1)
    bus.emit("smmu0", "cmd.consume", opcode="CMD_SYNC", index=2)
    bus.emit("smmu0", "cmd.consume", opcode="CMD_CFGI_STE", index=3)
    bus.emit("smmu0", "cmd.consume", index=4)  # no opcode: counted per kind, not per value
    bus.emit("smmu1", "cmd.consume", opcode="CMD_SYNC")
    assert counters.by_field("smmu0", "cmd.consume", "opcode") == {"CMD_SYNC": 2, "CMD_CFGI_STE": 1}
    assert counters.get("smmu0", "cmd.consume") == 4
    with pytest.raises(ValueError, match="'index' is not counted"):
        counters.by_field("smmu0", "cmd.consume", "index")


def test_unhashable_field_values_are_counted_by_repr() -> None:
    bus, counters = counted_bus("path")
    bus.emit("hyp", "walk", path=[1, 2])
    bus.emit("hyp", "walk", path=[1, 2])
    assert counters.by_field("hyp", "walk", "path") == {"[1, 2]": 2}


def test_snapshot_is_plain_and_does_not_change_afterwards() -> None:
    bus, counters = counted_bus("level")
    bus.emit("smmu0", "walk", level=3)
    snapshot = counters.snapshot()
    bus.emit("smmu0", "walk", level=3)
    assert snapshot == {"counts": {"smmu0": {"walk": 1}}, "by_field": {"smmu0": {"walk": {"level": {3: 1}}}}}


def test_diff_gives_the_delta_of_one_operation() -> None:
    bus, counters = counted_bus("level")
    bus.emit("smmu0", "walk", level=3)
    bus.emit("hyp", "trap")
    before = counters.snapshot()
    bus.emit("smmu0", "walk", level=3)
    bus.emit("smmu0", "walk", level=2)
    bus.emit("smmu0", "fault")
    delta = Counters.diff(before, counters.snapshot())
    assert delta == {
        "counts": {"smmu0": {"walk": 2, "fault": 1}},
        "by_field": {"smmu0": {"walk": {"level": {3: 1, 2: 1}}}},
    }


def test_diff_of_identical_snapshots_is_empty() -> None:
    bus, counters = counted_bus()
    bus.emit("smmu0", "walk")
    snapshot = counters.snapshot()
    assert Counters.diff(snapshot, snapshot) == {"counts": {}, "by_field": {}}


def test_clear_forgets_everything() -> None:
    bus, counters = counted_bus("level")
    bus.emit("smmu0", "walk", level=1)
    counters.clear()
    assert counters.snapshot() == {"counts": {}, "by_field": {}}
