"""JSONL and Chrome trace export: round trips, atomic writes, value conversion, malformed input."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path

import pytest

from pkvm_smmu.trace import (
    TRACE_FORMAT,
    JsonlSink,
    RecordingSink,
    TraceBus,
    TraceEvent,
    TraceFormatError,
    chrome_trace,
    load_jsonl,
    to_jsonable,
    write_chrome_trace,
    write_jsonl,
)


class Opcode(IntEnum):
    CMD_SYNC = 0x46


class Ownership(Enum):
    OWNED = "owned"


@dataclass(frozen=True)
class Where:
    sid: int
    name: str


def sample_events() -> list[TraceEvent]:
    clock = [0]
    bus = TraceBus(clock_ns=lambda: clock[0])
    sink = bus.attach(RecordingSink())
    bus.emit("smmu0", "cmd.consume", opcode="CMD_SYNC", index=3)
    clock[0] = 2_500
    with bus.span("hyp", "trap", offset=0x98):
        clock[0] = 4_000
    bus.emit("host.arm-smmu-v3", "probe", result="ok")
    return sink.events


def only_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# -- value conversion ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1 << 53, 1 << 53),
        ((1 << 53) + 1, hex((1 << 53) + 1)),
        (0xFFFF_FFFF_FFFF_F000, "0xfffffffffffff000"),
        (-(1 << 60), "-0x1000000000000000"),
        (True, True),
        (None, None),
        (Opcode.CMD_SYNC, "CMD_SYNC"),
        (Ownership.OWNED, "OWNED"),
        (b"\x01\xab", "01ab"),
        (bytearray(b"\xff"), "ff"),
        (Where(0x10, "dma0"), {"sid": 16, "name": "dma0"}),
        ((1, b"\x00"), [1, "00"]),
        ({5: Opcode.CMD_SYNC}, {"5": "CMD_SYNC"}),
        (float("nan"), "nan"),
        (Path("a/b"), "a/b"),
    ],
)
def test_to_jsonable_converts_sensibly(value: object, expected: object) -> None:
    assert to_jsonable(value) == expected


# -- JSONL ----------------------------------------------------------------------------------------------


def test_jsonl_round_trip_keeps_events_and_metadata(tmp_path: Path) -> None:
    events = sample_events()
    target = tmp_path / "run.jsonl"
    write_jsonl(events, target, {"design": "trap-emulate", "seed": 7})
    loaded = load_jsonl(target)
    assert loaded.metadata == {"design": "trap-emulate", "seed": 7}
    assert loaded.events == events


def test_jsonl_is_one_object_per_line_after_a_header(tmp_path: Path) -> None:
    target = tmp_path / "run.jsonl"
    write_jsonl(sample_events(), target)
    lines = target.read_text().splitlines()
    assert len(lines) == 4
    assert json.loads(lines[0])["trace_format"] == TRACE_FORMAT
    assert [json.loads(line)["seq"] for line in lines[1:]] == [0, 1, 2]


def test_jsonl_writes_non_native_values_converted(tmp_path: Path) -> None:
    target = tmp_path / "run.jsonl"
    with JsonlSink(target) as sink:
        sink(TraceEvent(0, 0, "smmu0", "fault", {"iova": 1 << 63, "opcode": Opcode.CMD_SYNC, "raw": b"\x02"}))
    (event,) = load_jsonl(target).events
    assert event.fields == {"iova": "0x8000000000000000", "opcode": "CMD_SYNC", "raw": "02"}


def test_jsonl_target_is_absent_until_close(tmp_path: Path) -> None:
    target = tmp_path / "run.jsonl"
    sink = JsonlSink(target)
    for event in sample_events():
        sink(event)
    assert not target.exists()
    sink.close()
    assert target.exists()
    assert only_files(tmp_path) == ["run.jsonl"]
    sink.close()  # harmless a second time
    assert len(load_jsonl(target).events) == 3


def test_jsonl_never_closed_leaves_no_partial_target_and_no_litter(tmp_path: Path) -> None:
    target = tmp_path / "run.jsonl"
    target.write_text("previous run\n")
    sink = JsonlSink(target)
    sink(sample_events()[0])
    del sink  # the run died before close()
    gc.collect()
    assert target.read_text() == "previous run\n"
    assert only_files(tmp_path) == ["run.jsonl"]


def test_jsonl_discard_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "run.jsonl"
    sink = JsonlSink(target)
    sink(sample_events()[0])
    sink.discard()
    assert only_files(tmp_path) == []


def test_jsonl_sink_as_context_manager_keeps_the_trace_of_a_failed_run(tmp_path: Path) -> None:
    target = tmp_path / "run.jsonl"
    with pytest.raises(RuntimeError), JsonlSink(target) as sink:
        sink(sample_events()[0])
        raise RuntimeError("scenario failed")
    assert len(load_jsonl(target).events) == 1


def test_jsonl_sink_streams_from_a_live_bus(tmp_path: Path) -> None:
    bus = TraceBus(metadata={"platform": "virt"})
    target = tmp_path / "live.jsonl"
    sink = bus.attach(JsonlSink(target, bus.metadata))
    bus.emit("smmu0", "walk", level=3)
    bus.detach(sink)
    sink.close()
    loaded = load_jsonl(target)
    assert loaded.metadata == {"platform": "virt"}
    assert [(e.component, e.kind, e.fields) for e in loaded.events] == [("smmu0", "walk", {"level": 3})]


# -- malformed JSONL ------------------------------------------------------------------------------------

GOOD_EVENT = '{"seq":0,"time_ns":0,"component":"a","kind":"x","fields":{}}'


@pytest.mark.parametrize(
    ("lines", "bad_line", "message"),
    [
        ([GOOD_EVENT, "{not json"], 2, "not JSON"),
        ([GOOD_EVENT, "[1, 2]"], 2, "expected a JSON object"),
        ([GOOD_EVENT, GOOD_EVENT.replace('"kind":"x",', "")], 2, "no 'kind'"),
        ([GOOD_EVENT.replace('"seq":0', '"seq":"0"')], 1, "'seq' should be int"),
        ([GOOD_EVENT.replace('"seq":0', '"seq":true')], 1, "'seq' should be int"),
        ([GOOD_EVENT.replace('"fields":{}', '"fields":[]')], 1, "'fields' should be dict"),
        ([GOOD_EVENT[:-1] + ',"dur_ns":-1}'], 1, "'dur_ns' should be a non-negative int"),
        ([GOOD_EVENT, "", f'{{"trace_format":"{TRACE_FORMAT}"}}'], 3, "first line"),
        (['{"trace_format":"other/9"}'], 1, "'other/9'"),
        ([f'{{"trace_format":"{TRACE_FORMAT}","metadata":3}}'], 1, "metadata"),
    ],
)
def test_malformed_jsonl_names_file_and_line(
    tmp_path: Path, lines: list[str], bad_line: int, message: str
) -> None:
    target = tmp_path / "bad.jsonl"
    target.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError, match=message) as caught:
        load_jsonl(target)
    assert caught.value.line == bad_line
    assert caught.value.path == str(target)
    assert f"{target}, line {bad_line}:" in str(caught.value)


def test_jsonl_without_header_or_with_blank_lines_loads(tmp_path: Path) -> None:
    target = tmp_path / "bare.jsonl"
    target.write_text(GOOD_EVENT + "\n\n" + GOOD_EVENT.replace('"seq":0', '"seq":1') + "\n")
    loaded = load_jsonl(target)
    assert loaded.metadata == {}
    assert [e.seq for e in loaded.events] == [0, 1]


# -- Chrome / Perfetto ----------------------------------------------------------------------------------


def test_chrome_trace_file_is_valid_trace_event_json(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    write_chrome_trace(sample_events(), target, {"design": "trap-emulate", "huge": 1 << 64})
    document = json.loads(target.read_text())
    assert set(document) >= {"traceEvents", "metadata"}
    assert document["metadata"] == {"design": "trap-emulate", "huge": hex(1 << 64)}
    for entry in document["traceEvents"]:
        assert {"name", "ph", "pid", "tid"} <= set(entry)
        assert entry["pid"] == 1
    assert only_files(tmp_path) == ["run.json"]


def test_chrome_trace_names_one_thread_per_component() -> None:
    document = chrome_trace(sample_events())
    names = {
        entry["tid"]: entry["args"]["name"]
        for entry in document["traceEvents"]
        if entry["ph"] == "M" and entry["name"] == "thread_name"
    }
    assert sorted(names.values()) == ["host.arm-smmu-v3", "hyp", "smmu0"]
    assert len(set(names)) == 3
    for entry in document["traceEvents"]:
        if entry["ph"] != "M":
            assert names[entry["tid"]] in {"host.arm-smmu-v3", "hyp", "smmu0"}


def test_chrome_trace_times_are_microseconds_and_spans_are_complete_events() -> None:
    document = chrome_trace(sample_events())
    timed = [entry for entry in document["traceEvents"] if entry["ph"] != "M"]
    instant, span, probe = timed
    assert (instant["ph"], instant["s"], instant["ts"], instant["name"]) == ("i", "t", 0, "cmd.consume")
    assert instant["args"] == {"opcode": "CMD_SYNC", "index": 3}
    assert (span["ph"], span["ts"], span["dur"]) == ("X", 2.5, 1.5)
    assert "s" not in span
    assert (probe["ph"], probe["ts"]) == ("i", 4.0)


def test_chrome_trace_of_no_events_is_still_valid(tmp_path: Path) -> None:
    target = tmp_path / "empty.json"
    write_chrome_trace([], target)
    document = json.loads(target.read_text())
    assert document["metadata"] == {}
    assert all(entry["ph"] == "M" for entry in document["traceEvents"])
