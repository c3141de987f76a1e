"""``Translator.observer``: verification tools see every translation with the cached structures it
used, the micro-TLB is bypassed while an observer is set, and TLB hits and misses reach the trace."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from pkvm_smmu.arch.events import EventType
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.smmu.decode import ContextConfig, StreamConfig
from pkvm_smmu.machine.smmu.tlb import TlbEntry
from pkvm_smmu.machine.smmu.types import Outcome, Transaction, TranslationKind, TranslationResult
from pkvm_smmu.pgtable import Prot
from pkvm_smmu.trace.bus import TraceEvent

sys.path.insert(0, os.path.dirname(__file__))
from harness import SmmuHarness, harness, map_pages, nested_stream

SID = 0x21
IOVA = 0x4567_8000_0000


@dataclass
class Seen:
    txn: Transaction
    stream: StreamConfig | None
    context: ContextConfig | None
    entry: TlbEntry | None
    result: TranslationResult


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Seen] = []

    def __call__(
        self,
        txn: Transaction,
        stream: StreamConfig | None,
        context: ContextConfig | None,
        entry: TlbEntry | None,
        result: TranslationResult,
    ) -> None:
        self.seen.append(Seen(txn, stream, context, entry, result))


def stage1_stream(h: SmmuHarness, pages: int = 2) -> int:
    """SID with stage 1 only; ``pages`` pages at IOVA; returns the buffer's PA."""
    pt = h.s1_table()
    buf = h.buffer(pages * 4096)
    map_pages(pt, IOVA, buf, pages * 4096)
    cds = h.cd_table()
    h.write_cd(cds, 0, h.cd(pt, asid=3))
    h.write_ste(SID, h.ste_s1(cds))
    return buf


def test_observer_sees_the_cached_structures_a_dma_used() -> None:
    h = harness()
    buf = stage1_stream(h)
    recorder = Recorder()
    h.smmu.translator.observer = recorder
    ep = DmaEndpoint("dev", h.smmu, SID)
    assert ep.write(IOVA + 4096 - 8, bytes(range(16))).ok  # two pages: two translations
    assert [s.txn.address for s in recorder.seen] == [IOVA + 4096 - 8, IOVA + 4096]
    (stream,) = h.smmu.config_cache.cached_streams()
    (context,) = h.smmu.config_cache.cached_contexts()
    cached = list(h.smmu.tlb.entries())
    assert len(cached) == 2
    for seen, entry in zip(recorder.seen, cached, strict=True):
        assert seen.stream is stream and seen.context is context
        assert entry.kind is TranslationKind.S1 and len(entry.sources) == 4
        assert seen.entry is entry  # the very entry the TLB holds, with its source descriptors
        assert seen.result.outcome is Outcome.OK
        assert seen.result.output_address == buf + (seen.txn.address - IOVA)


def test_micro_tlb_is_bypassed_while_an_observer_is_set() -> None:
    h = harness()
    buf = stage1_stream(h)
    translator = h.smmu.translator
    txn = Transaction(SID, IOVA + 0x10, 8, False)
    assert translator.translate(txn).output_address == buf + 0x10  # fills the TLB and micro-TLB
    recorder = Recorder()
    translator.observer = recorder
    for _ in range(3):
        assert translator.translate(txn).output_address == buf + 0x10
    (entry,) = h.smmu.tlb.entries()
    assert [s.entry for s in recorder.seen] == [entry] * 3  # every use, not only the first
    translator.observer = None
    translator.translate(txn)
    assert len(recorder.seen) == 3


def test_observer_sees_faults_and_the_disabled_smmu() -> None:
    h = harness()
    stage1_stream(h)
    recorder = Recorder()
    h.smmu.translator.observer = recorder
    unmapped = h.smmu.translate(Transaction(SID, IOVA + 0x10_0000, 8, False))
    assert unmapped.outcome is Outcome.ABORT
    fault = recorder.seen[-1]
    assert fault.stream is not None and fault.context is not None and fault.entry is None
    assert fault.result is unmapped
    h.enable(smmuen=False)
    h.smmu.translate(Transaction(SID, IOVA, 8, False))
    disabled = recorder.seen[-1]
    assert (disabled.stream, disabled.context, disabled.entry) == (None, None, None)


def test_observer_sees_the_combined_entry_of_a_nested_translation() -> None:
    h = harness()
    n = nested_stream(h)
    recorder = Recorder()
    h.smmu.translator.observer = recorder
    ep = DmaEndpoint("dev", h.smmu, n.sid)
    assert ep.read(n.va, 8).ok
    assert ep.read(n.va + 8, 8).ok  # a TLB hit, still observed
    first, second = recorder.seen
    assert first.entry is second.entry and first.entry is not None
    assert first.entry.kind is TranslationKind.NESTED
    assert first.stream is not None and first.stream.s2
    # Stage-1 table reads through stage 2, the stage-1 walk and the final stage-2 walk.
    assert len(first.entry.sources) > 8


def test_tlb_hits_and_misses_reach_the_trace() -> None:
    h = harness()
    stage1_stream(h)
    events: list[TraceEvent] = []
    translator = h.smmu.translator
    txn = Transaction(SID, IOVA, 8, False)
    translator.translate(txn)  # a miss, while tracing is off
    h.smmu.trace.attach(events.append)
    translator.translate(txn)  # a micro-TLB hit
    translator.translate(Transaction(SID, IOVA + 4096, 8, False))  # a miss
    kinds = [(e.kind, e.fields["address"]) for e in events if e.kind.startswith("tlb.")]
    assert kinds == [("tlb.hit", IOVA), ("tlb.miss", IOVA + 4096)]
    assert events[0].fields["sid"] == SID


def override_stream(h: SmmuHarness, prot: int, **ste_fields: int) -> None:
    pt = h.s1_table()
    map_pages(pt, IOVA, h.buffer(), 4096, prot)
    cds = h.cd_table()
    h.write_cd(cds, 0, h.cd(pt, asid=3))
    h.write_ste(SID, h.ste_s1(cds, **ste_fields))


def test_micro_tlb_keeps_instcfg_a_read_is_still_an_instruction_fetch() -> None:
    # INSTCFG=0b11: every read is an instruction fetch. A write (always data) must not let a later
    # read of the same page skip the execute check.
    h = harness()
    override_stream(h, Prot.READ | Prot.WRITE | Prot.NOEXEC, INSTCFG=3)
    assert h.smmu.translate(Transaction(SID, IOVA, 8, True)).outcome is Outcome.OK
    assert h.smmu.translate(Transaction(SID, IOVA, 8, False)).outcome is Outcome.ABORT
    assert h.one_event()[0] is EventType.F_PERMISSION


def test_micro_tlb_keeps_privcfg_an_unprivileged_device_is_still_privileged() -> None:
    # PRIVCFG=0b11: every access is privileged, whatever PnU the device sends.
    h = harness()
    override_stream(h, Prot.READ | Prot.WRITE | Prot.PRIV, PRIVCFG=3)
    for privileged in (True, False, True, False):
        result = h.smmu.translate(Transaction(SID, IOVA, 8, False, privileged=privileged))
        assert result.outcome is Outcome.OK
