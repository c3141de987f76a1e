"""Sinks and file formats: in-memory recording, streamed JSONL, and Chrome/Perfetto trace-event JSON.

A JSONL trace is a header line ``{"trace_format": "pkvm-smmu-trace/1", "metadata": {...}}`` followed by
one event per line ``{"seq", "time_ns", "component", "kind", "fields"[, "dur_ns"]}``. Field values are
written through ``to_jsonable``, so reading a trace back gives JSON values (a 64-bit address comes back
as a hex string).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from pkvm_smmu.trace._atomic import AtomicTextFile
from pkvm_smmu.trace._jsonable import to_jsonable
from pkvm_smmu.trace.bus import TraceEvent

TRACE_FORMAT = "pkvm-smmu-trace/1"
_COMPACT = (",", ":")


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""

    def __init__(self, path: str | os.PathLike[str], line: int, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}, line {line}: {problem}")
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem


class RecordingSink:
    """Keeps every event in ``events``, for tests and for export after a run."""

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []

    def __call__(self, event: TraceEvent) -> None:
        self.events.append(event)

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[TraceEvent]:
        return iter(self.events)

    def select(self, component: str | None = None, kind: str | None = None) -> list[TraceEvent]:
        """The recorded events of one component and/or one exact kind."""
        return [
            event
            for event in self.events
            if (component is None or event.component == component) and (kind is None or event.kind == kind)
        ]

    def clear(self) -> None:
        self.events.clear()


def event_to_json(event: TraceEvent) -> dict[str, Any]:
    record: dict[str, Any] = {
        "seq": event.seq,
        "time_ns": event.time_ns,
        "component": event.component,
        "kind": event.kind,
        "fields": to_jsonable(event.fields),
    }
    if event.dur_ns is not None:
        record["dur_ns"] = event.dur_ns
    return record


class JsonlSink:
    """Streams events to ``path`` as JSONL; the file appears, complete, only on ``close()``."""

    def __init__(self, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> None:
        self._file = AtomicTextFile(path)
        self.path = self._file.path
        header = {"trace_format": TRACE_FORMAT, "metadata": to_jsonable(metadata or {})}
        self._file.write(json.dumps(header, separators=_COMPACT) + "\n")

    def __call__(self, event: TraceEvent) -> None:
        self._file.write(json.dumps(event_to_json(event), separators=_COMPACT) + "\n")

    def close(self) -> None:
        """Publish the file at its path (atomically). Closing twice is harmless."""
        self._file.commit()

    def discard(self) -> None:
        """Drop everything written so far; the target path is left as it was."""
        self._file.discard()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Kept even when the run raised: each line is whole, and a failed run's trace is the useful one.
        self.close()


def write_jsonl(
    events: Iterable[TraceEvent], path: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> None:
    with JsonlSink(path, metadata) as sink:
        for event in events:
            sink(event)


@dataclass(frozen=True, slots=True)
class TraceLog:
    """A trace read back from a file."""

    metadata: dict[str, Any] = field(default_factory=dict)
    events: list[TraceEvent] = field(default_factory=list)


_REQUIRED = {"seq": int, "time_ns": int, "component": str, "kind": str, "fields": dict}


def _parse_event(record: dict[str, Any], path: str | os.PathLike[str], line: int) -> TraceEvent:
    for name, expected in _REQUIRED.items():
        if name not in record:
            raise TraceFormatError(path, line, f"event has no {name!r}")
        value = record[name]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise TraceFormatError(path, line, f"{name!r} should be {expected.__name__}, got {value!r}")
    dur_ns = record.get("dur_ns")
    if dur_ns is not None and (not isinstance(dur_ns, int) or isinstance(dur_ns, bool) or dur_ns < 0):
        raise TraceFormatError(path, line, f"'dur_ns' should be a non-negative int, got {dur_ns!r}")
    return TraceEvent(
        record["seq"], record["time_ns"], record["component"], record["kind"], record["fields"], dur_ns
    )


def _parse_header(record: dict[str, Any], path: str | os.PathLike[str], line: int) -> dict[str, Any]:
    if line != 1:
        raise TraceFormatError(path, line, "a header may only be the first line")
    if record["trace_format"] != TRACE_FORMAT:
        raise TraceFormatError(path, line, f"format {record['trace_format']!r} is not {TRACE_FORMAT!r}")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise TraceFormatError(path, line, "header 'metadata' should be an object")
    return metadata


def load_jsonl(path: str | os.PathLike[str]) -> TraceLog:
    """Read a JSONL trace; malformed input raises ``TraceFormatError`` naming the file and line."""
    metadata: dict[str, Any] = {}
    events: list[TraceEvent] = []
    with open(path, encoding="utf-8") as stream:
        for line_number, text in enumerate(stream, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise TraceFormatError(path, line_number, f"not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise TraceFormatError(path, line_number, "expected a JSON object")
            if "trace_format" in record:
                metadata = _parse_header(record, path, line_number)
            else:
                events.append(_parse_event(record, path, line_number))
    return TraceLog(metadata, events)


def chrome_trace(events: Iterable[TraceEvent], metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Chrome trace-event JSON document (opens in ui.perfetto.dev): one thread per component."""
    thread_ids: dict[str, int] = {}
    trace_events: list[dict[str, Any]] = []
    for event in events:
        tid = thread_ids.setdefault(event.component, len(thread_ids) + 1)
        entry: dict[str, Any] = {
            "name": event.kind,
            "cat": event.kind.split(".", 1)[0],
            "pid": 1,
            "tid": tid,
            "ts": event.time_ns / 1000,  # the format counts microseconds
            "args": to_jsonable(event.fields),
        }
        if event.dur_ns is None:
            entry.update(ph="i", s="t")
        else:
            entry.update(ph="X", dur=event.dur_ns / 1000)
        trace_events.append(entry)
    names: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "pkvm-smmu"}}
    ]
    for component, tid in thread_ids.items():
        thread = {"ph": "M", "pid": 1, "tid": tid}
        names.append({"name": "thread_name", **thread, "args": {"name": component}})
        names.append({"name": "thread_sort_index", **thread, "args": {"sort_index": tid}})
    return {
        "traceEvents": names + trace_events,
        "displayTimeUnit": "ns",
        "metadata": to_jsonable(metadata or {}),
    }


def write_chrome_trace(
    events: Iterable[TraceEvent], path: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> None:
    """Write ``chrome_trace(events, metadata)`` to ``path`` atomically."""
    text = json.dumps(chrome_trace(events, metadata), separators=_COMPACT)
    output = AtomicTextFile(path)
    output.write(text)
    output.commit()
