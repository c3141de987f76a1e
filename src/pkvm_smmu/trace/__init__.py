"""One event bus every layer writes to; counters derived from it; JSONL and Chrome/Perfetto export.

Typical use::

    trace = TraceBus(clock_ns=lambda: clock.now_ns, metadata={"design": "trap-emulate"})
    counters = trace.attach(Counters(by_fields=["opcode"]))
    ...
    if trace.enabled:
        trace.emit("smmu0", "cmd.consume", opcode="CMD_SYNC")
"""

from pkvm_smmu.trace._jsonable import to_jsonable
from pkvm_smmu.trace.bus import Sink, Span, TraceBus, TraceEvent
from pkvm_smmu.trace.counters import Counters, Snapshot, kind_matches
from pkvm_smmu.trace.export import (
    TRACE_FORMAT,
    JsonlSink,
    RecordingSink,
    TraceFormatError,
    TraceLog,
    chrome_trace,
    event_to_json,
    load_jsonl,
    write_chrome_trace,
    write_jsonl,
)

__all__ = [
    "TRACE_FORMAT",
    "Counters",
    "JsonlSink",
    "RecordingSink",
    "Sink",
    "Snapshot",
    "Span",
    "TraceBus",
    "TraceEvent",
    "TraceFormatError",
    "TraceLog",
    "chrome_trace",
    "event_to_json",
    "kind_matches",
    "load_jsonl",
    "to_jsonable",
    "write_chrome_trace",
    "write_jsonl",
]
