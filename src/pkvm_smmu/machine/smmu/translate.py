"""The SMMU's translation flow (IHI 0070 §3, reference card §6): bypass and GBPA, stream and
context lookup, stage 1 / stage 2 / nested translation through the TLB, fault recording, and ATS.

Device-facing entry points are ``translate``, ``dma_read``, ``dma_write`` and ``ats_request``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

from pkvm_smmu.arch.events import EVENT_FIELDS, EventType, FaultClass, build_event
from pkvm_smmu.arch.registers import GBPA
from pkvm_smmu.arch.strtab import Eats, S1Dss, SteConfig
from pkvm_smmu.machine.bus import ExternalAbort, Initiator, InitiatorKind
from pkvm_smmu.machine.smmu.config import ConfigFault
from pkvm_smmu.machine.smmu.decode import ContextConfig, StreamConfig
from pkvm_smmu.machine.smmu.tlb import TlbEntry
from pkvm_smmu.machine.smmu.types import (
    Outcome,
    Transaction,
    TranslationKind,
    TranslationResult,
    WalkConfig,
    WalkFault,
    WalkLeaf,
)
from pkvm_smmu.machine.smmu.walk import _leaf as _walk_leaf
from pkvm_smmu.machine.smmu.walk import check_permission, walk

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

_PAGE_SHIFT = 12
_PAGE_SIZE = 1 << _PAGE_SHIFT
_TOP_BYTE_MASK = (1 << 56) - 1
_ALL_ONES_64 = (1 << 64) - 1
_ABORT = TranslationResult(Outcome.ABORT)
_TRANSLATION_FAULTS = frozenset(
    {EventType.F_TRANSLATION, EventType.F_ADDR_SIZE, EventType.F_ACCESS, EventType.F_PERMISSION}
)

DescriptorReader = Callable[[int], "int | ExternalAbort"]
IpaTranslator = Callable[[int], "int | WalkFault"]


class AtsStatus(Enum):
    SUCCESS = "success"  # a translation completion (its permissions may still be none)
    UNSUPPORTED_REQUEST = "UR"
    COMPLETER_ABORT = "CA"


@dataclass(frozen=True, slots=True)
class AtsResponse:
    """The completion of an ATS Translation Request (PCIe ATS; IHI 0070 §3.9)."""

    status: AtsStatus
    output_address: int = 0
    size: int = 0  # bytes covered by the translation
    readable: bool = False
    writable: bool = False


@dataclass(frozen=True, slots=True)
class _Fault:
    """A fault on the way to a translation, before its record is built."""

    event_type: EventType
    stage: int = 1
    fault_class: FaultClass = FaultClass.IN
    ipa: int = 0
    fetch_address: int = 0
    record: bool = True
    abort: bool = True  # False: terminate with RAZ/WI (stage 1 with CD.A=0)


class Translator:
    def __init__(self, smmu: SmmuV3) -> None:
        self.smmu = smmu
        # A derived accelerator over the architectural TLB: (sid, ssid, page) -> (entry, pa - va).
        # Emptied whenever the TLB or configuration caches change, so it never outlives them.
        self._micro_tlb: dict[tuple[int, int | None, int], tuple[TlbEntry, int]] = {}
        self._micro_stamp = (-1, -1)
        self._readers: dict[int, DescriptorReader] = {}  # per StreamID: descriptor reads of walks
        self._device_initiators: dict[tuple[int, int | None], Initiator] = {}
        self._answering_ats = False
        # While answering a Translation Request: a configuration error was met (-> CA), and the
        # stage-1 output address (an IPA when nested: the split-stage ATS completion).
        self._ats_config_error = False
        self._ats_ipa = 0

    # -- device-facing ------------------------------------------------------------------------
    def translate(self, txn: Transaction) -> TranslationResult:
        smmu = self.smmu
        if not smmu.smmu_enabled:
            return self._smmu_disabled(txn)
        if txn.ats_translated:
            return self._ats_translated(txn)
        stamp = (smmu.tlb.generation, smmu.config_cache.generation)
        if stamp != self._micro_stamp:
            self._micro_tlb.clear()
            self._micro_stamp = stamp
        hit = self._micro_tlb.get((txn.stream_id, txn.substream_id, txn.address >> _PAGE_SHIFT))
        if hit is not None and not txn.instruction:
            entry, offset = hit
            if txn.is_write:
                permitted = entry.writable and entry.s2_writable
            else:
                permitted = entry.readable and entry.s2_readable
            if permitted and (txn.privileged or entry.unpriv):
                return TranslationResult(Outcome.OK, txn.address + offset)
        return self._translate_slow(txn)

    def dma_read(self, txn: Transaction) -> bytes | TranslationResult:
        """Translate and read ``txn.size`` bytes; RAZ/WI termination reads zeros."""
        out = bytearray()
        for part in _split_at_pages(txn):
            result = self.translate(part)
            if result.outcome is Outcome.ABORT:
                return result
            if result.outcome is Outcome.RAZ_WI:
                out += bytes(part.size)
                continue
            data = self.smmu.bus.read_bytes(self._device_initiator(part), result.output_address, part.size)
            if isinstance(data, ExternalAbort):
                return TranslationResult(Outcome.ABORT, result.output_address)
            out += data
        return bytes(out)

    def dma_write(self, txn: Transaction, data: bytes) -> TranslationResult:
        """Translate and write ``data``; the first aborting part's result, or the last result."""
        offset = 0
        last = TranslationResult(Outcome.OK)
        for part in _split_at_pages(txn):
            result = self.translate(part)
            if result.outcome is Outcome.ABORT:
                return result
            if result.outcome is Outcome.OK:
                chunk = data[offset : offset + part.size]
                err = self.smmu.bus.write_bytes(self._device_initiator(part), result.output_address, chunk)
                if err is not None:
                    return TranslationResult(Outcome.ABORT, result.output_address)
            offset += part.size
            last = result
        return last

    def _device_initiator(self, txn: Transaction) -> Initiator:
        key = (txn.stream_id, txn.substream_id)
        initiator = self._device_initiators.get(key)
        if initiator is None:
            initiator = Initiator(
                InitiatorKind.DEVICE, "dma", stream_id=txn.stream_id, substream_id=txn.substream_id
            )
            self._device_initiators[key] = initiator
        return initiator

    # -- disabled, bypass, ATS Translated -------------------------------------------------------
    def _smmu_disabled(self, txn: Transaction) -> TranslationResult:
        if txn.ats_translated:
            # Translated traffic with SMMUEN=0 is forbidden (F_TRANSL_FORBIDDEN may be recorded).
            return self._report(txn, _Fault(EventType.F_TRANSL_FORBIDDEN))
        if GBPA.ABORT.get(self.smmu.gbpa):
            return _ABORT
        return TranslationResult(Outcome.OK, txn.address)

    def _ats_translated(self, txn: Transaction) -> TranslationResult:
        if not self.smmu.atschk:
            # "Fast mode": ATS Translated traffic passes with no stream table or TLB lookup.
            return TranslationResult(Outcome.OK, txn.address)
        stream = self.smmu.config_cache.lookup_stream(txn.stream_id)
        if isinstance(stream, ConfigFault) or stream.illegal is not None or stream.config == SteConfig.ABORT:
            # Aborted; configuration errors are recorded only with SMMU_CR2.REC_CFG_ATS, which this
            # model does not implement (§3.9.1.3).
            return _ABORT
        eats = self._effective_eats(stream)
        if eats == Eats.TRANS:
            return TranslationResult(Outcome.OK, txn.address)
        if eats == Eats.S1CHK and stream.s2_walk is not None:
            # Split-stage ATS: the device holds an IPA, which stage 2 still translates. Without
            # SMMU_IDR3.PASIDTT the transaction counts as PnU = 0, InD = 0 (before PRIVCFG).
            return self._stage2_only(txn, stream, stream.privcfg == 3, False)
        return self._report(txn, _Fault(EventType.F_TRANSL_FORBIDDEN))

    def _effective_eats(self, stream: StreamConfig) -> int:
        """STE.EATS as it behaves: split-stage needs CR0.ATSCHK, else it behaves as 0b00 (§5.2)."""
        if stream.eats == Eats.S1CHK and not self.smmu.atschk:
            return Eats.ABT
        return stream.eats

    # -- the full flow -------------------------------------------------------------------------
    def _translate_slow(self, txn: Transaction) -> TranslationResult:
        stream = self.smmu.config_cache.lookup_stream(txn.stream_id)
        if isinstance(stream, ConfigFault):
            return self._report(txn, self._config_fault(stream))
        return self._translate_stream(txn, stream)

    def _translate_stream(self, txn: Transaction, stream: StreamConfig) -> TranslationResult:
        smmu = self.smmu
        if stream.illegal is not None:
            return self._report(txn, _Fault(EventType.C_BAD_STE))
        if stream.config == SteConfig.ABORT:
            return _ABORT  # silent abort, no event
        privileged, instruction = _effective_attributes(txn, stream)
        ssid = txn.substream_id
        if ssid is not None and (not stream.s1 or smmu.features.ssid_bits == 0):
            return self._report(txn, _Fault(EventType.C_BAD_SUBSTREAMID))
        if stream.config == SteConfig.BYPASS:
            return TranslationResult(Outcome.OK, txn.address)
        if stream.s1:
            index = self._cd_index(stream, ssid)
            if isinstance(index, _Fault):
                return self._report(txn, index)
            if index is not None:
                s2_fetch = self._cd_fetch_through_s2(stream) if stream.s2 else None
                context = smmu.config_cache.lookup_context(stream, index, s2_fetch)
                if isinstance(context, ConfigFault):
                    return self._report(txn, self._config_fault(context))
                if context.illegal is not None:
                    return self._report(txn, _Fault(EventType.C_BAD_CD))
                return self._stage1(txn, stream, context, privileged, instruction)
            # S1DSS=BYPASS and no SubstreamID: stage 1 is skipped.
        if stream.s2:
            return self._stage2_only(txn, stream, privileged, instruction)
        return TranslationResult(Outcome.OK, txn.address)

    @staticmethod
    def _cd_index(stream: StreamConfig, ssid: int | None) -> int | _Fault | None:
        """CD table index for a transaction, None for "stage 1 bypassed" (S1DSS), or a fault."""
        if ssid is None:
            if not stream.s1_cdmax:
                return 0
            if stream.s1_dss == S1Dss.TERMINATE:
                return _Fault(EventType.F_STREAM_DISABLED)
            if stream.s1_dss == S1Dss.BYPASS:
                return None
            return 0  # S1DSS=SSID0
        if not stream.s1_cdmax or ssid >> stream.s1_cdmax:
            return _Fault(EventType.C_BAD_SUBSTREAMID)
        if ssid == 0 and stream.s1_dss == S1Dss.SSID0:
            return _Fault(EventType.F_STREAM_DISABLED)
        return ssid

    # -- stage 1 (and nested) -------------------------------------------------------------------
    def _stage1(
        self,
        txn: Transaction,
        stream: StreamConfig,
        context: ContextConfig,
        privileged: bool,
        instruction: bool,
    ) -> TranslationResult:
        va = txn.address
        upper = (va >> 55) & 1
        walk_cfg = context.ttb1 if upper else context.ttb0
        tbi = context.tbi1 if upper else context.tbi0
        # With TBI the top byte is ignored: treat it as the sign extension of bit 55.
        tlb_va = ((va & _TOP_BYTE_MASK) | ((0xFF << 56) if upper else 0)) if tbi else va
        s1_fault = _Fault(EventType.F_TRANSLATION, record=context.record, abort=context.abort)
        if walk_cfg is None:  # EPDx: no walk
            return self._report(txn, s1_fault)
        expected_top = (_ALL_ONES_64 >> walk_cfg.input_bits) if upper else 0
        if tlb_va >> walk_cfg.input_bits != expected_top:  # in neither TTB0's nor TTB1's range
            return self._report(txn, s1_fault)
        reduced = tlb_va & ((1 << walk_cfg.input_bits) - 1)
        region_base = tlb_va - reduced
        kind = TranslationKind.NESTED if stream.s2 else TranslationKind.S1
        entry = self.smmu.tlb.lookup(kind, stream.world, stream.vmid, context.asid, tlb_va)
        if entry is None:
            built = self._fill_stage1(txn, stream, context, walk_cfg, reduced, region_base, kind)
            if isinstance(built, _Fault):
                return self._report(txn, built)
            entry = built
        failing_stage = _failing_stage(entry, txn.is_write, privileged, instruction)
        if failing_stage == 1:
            return self._report(
                txn, _Fault(EventType.F_PERMISSION, record=context.record, abort=context.abort)
            )
        if failing_stage == 2:
            ipa = entry.ipa_base + (tlb_va - entry.input_base)
            return self._report(txn, _Fault(EventType.F_PERMISSION, 2, ipa=ipa, record=stream.s2_record))
        offset = entry.output_base - entry.input_base + (tlb_va - va)
        if self._answering_ats:
            self._ats_ipa = entry.ipa_base + (tlb_va - entry.input_base)
        if not instruction and privileged == txn.privileged:
            self._micro_tlb[(txn.stream_id, txn.substream_id, va >> _PAGE_SHIFT)] = (entry, offset)
        return TranslationResult(Outcome.OK, va + offset)

    def _fill_stage1(
        self,
        txn: Transaction,
        stream: StreamConfig,
        context: ContextConfig,
        walk_cfg: WalkConfig,
        reduced: int,
        region_base: int,
        kind: TranslationKind,
    ) -> TlbEntry | _Fault:
        s2_sources: list[int] = []
        translate_table: IpaTranslator | None = None
        if stream.s2:

            def translate_table(ipa: int) -> int | WalkFault:
                leaf = self._s2_leaf(stream, ipa)
                if isinstance(leaf, WalkFault):
                    return leaf
                s2_sources.extend(leaf.path)
                # A descriptor read needs stage-2 read permission; S2PTW also forbids Device memory.
                if not leaf.readable or (stream.s2_ptw and _s2_is_device(leaf.attr)):
                    return WalkFault(EventType.F_PERMISSION, 2, leaf.level, FaultClass.TT, ipa=ipa)
                return leaf.output_base + (ipa - leaf.input_base)

        result = walk(walk_cfg, reduced, self._descriptor_reader(txn.stream_id), translate_table)
        if isinstance(result, WalkFault):
            if result.stage == 2:  # a stage-1 descriptor's IPA failed stage 2 (CLASS=TT)
                return _Fault(
                    result.event_type,
                    2,
                    FaultClass.TT,
                    ipa=result.ipa,
                    fetch_address=result.fetch_address,
                    record=stream.s2_record,
                )
            fault_class = FaultClass.TT if result.event_type == EventType.F_WALK_EABT else FaultClass.IN
            return _Fault(
                result.event_type,
                1,
                fault_class,
                fetch_address=result.fetch_address,
                record=context.record,
                abort=context.abort,
            )
        leaf = result
        size, input_base, output_base, ipa_base = (
            leaf.size,
            leaf.input_base,
            leaf.output_base,
            leaf.output_base,
        )
        s2_readable = s2_writable = s2_executable = True
        sources: tuple[int, ...] = (*s2_sources, *leaf.path)
        if stream.s2:
            ipa = leaf.output_base + (reduced - leaf.input_base)
            s2_leaf = self._s2_leaf(stream, ipa)
            if isinstance(s2_leaf, WalkFault):
                return _Fault(
                    s2_leaf.event_type,
                    2,
                    FaultClass.IN,
                    ipa=ipa,
                    fetch_address=s2_leaf.fetch_address,
                    record=stream.s2_record,
                )
            # The combined entry covers the smaller of the two leaves.
            size = min(leaf.size, s2_leaf.size)
            input_base = reduced & ~(size - 1)
            ipa_base = ipa & ~(size - 1)
            output_base = s2_leaf.output_base + (ipa_base - s2_leaf.input_base)
            s2_readable, s2_writable, s2_executable = s2_leaf.readable, s2_leaf.writable, s2_leaf.executable
            sources = (*sources, *s2_leaf.path)
        entry = TlbEntry(
            kind=kind,
            world=stream.world,
            vmid=stream.vmid,
            asid=None if leaf.global_entry else context.asid,
            input_base=region_base + input_base,
            size=size,
            output_base=output_base,
            readable=leaf.readable,
            writable=leaf.writable,
            unpriv=leaf.unpriv,
            executable=leaf.executable,
            priv_executable=leaf.priv_executable,
            attr=leaf.attr,
            level=leaf.level,
            sources=sources,
            ipa_base=ipa_base,
            s2_readable=s2_readable,
            s2_writable=s2_writable,
            s2_executable=s2_executable,
            leaf_size=leaf.size if leaf.size > size else 0,
        )
        self.smmu.tlb.insert(entry)
        return entry

    # -- stage 2 -------------------------------------------------------------------------------
    def _s2_leaf(self, stream: StreamConfig, ipa: int) -> WalkLeaf | WalkFault:
        """Stage-2 translation of ``ipa``, through the TLB's stage-2 entries."""
        assert stream.s2_walk is not None
        tlb = self.smmu.tlb
        entry = tlb.lookup(TranslationKind.S2, stream.world, stream.vmid, None, ipa)
        if entry is not None:
            return _walk_leaf(  # the walker's fast constructor: same object as WalkLeaf(...)
                entry.input_base,
                entry.output_base,
                entry.level,
                entry.size,
                0,
                0,
                entry.sources,
                entry.readable,
                entry.writable,
                True,
                entry.executable,
                entry.executable,
                True,
                entry.attr,
            )
        result = walk(stream.s2_walk, ipa, self._descriptor_reader(stream.sid), None)
        if isinstance(result, WalkLeaf):
            tlb.insert(
                TlbEntry(
                    kind=TranslationKind.S2,
                    world=stream.world,
                    vmid=stream.vmid,
                    asid=None,
                    input_base=result.input_base,
                    size=result.size,
                    output_base=result.output_base,
                    readable=result.readable,
                    writable=result.writable,
                    unpriv=True,
                    executable=result.executable,
                    priv_executable=result.executable,
                    attr=result.attr,
                    level=result.level,
                    sources=result.path,
                    ipa_base=result.input_base,
                )
            )
        return result

    def _stage2_only(
        self, txn: Transaction, stream: StreamConfig, privileged: bool, instruction: bool
    ) -> TranslationResult:
        ipa = txn.address
        if ipa >> self.smmu.features.ias_bits:
            # Stage 1 bypassed: an input beyond IAS is a stage-1 address size fault.
            return self._report(txn, _Fault(EventType.F_ADDR_SIZE))
        leaf = self._s2_leaf(stream, ipa)
        if isinstance(leaf, WalkFault):
            return self._report(
                txn,
                _Fault(
                    leaf.event_type,
                    2,
                    FaultClass.IN,
                    ipa=ipa,
                    fetch_address=leaf.fetch_address,
                    record=stream.s2_record,
                ),
            )
        if not check_permission(leaf, 2, txn.is_write, privileged, instruction):
            return self._report(txn, _Fault(EventType.F_PERMISSION, 2, ipa=ipa, record=stream.s2_record))
        offset = leaf.output_base - leaf.input_base
        if not instruction and not txn.ats_translated:
            entry = self.smmu.tlb.lookup(TranslationKind.S2, stream.world, stream.vmid, None, ipa)
            if entry is not None:
                self._micro_tlb[(txn.stream_id, txn.substream_id, ipa >> _PAGE_SHIFT)] = (entry, offset)
        return TranslationResult(Outcome.OK, ipa + offset)

    def _cd_fetch_through_s2(self, stream: StreamConfig) -> IpaTranslator:
        def fetch(ipa: int) -> int | WalkFault:
            leaf = self._s2_leaf(stream, ipa)
            if isinstance(leaf, WalkFault):
                return WalkFault(
                    leaf.event_type, 2, leaf.level, FaultClass.CD, ipa=ipa, fetch_address=leaf.fetch_address
                )
            if not leaf.readable:
                return WalkFault(EventType.F_PERMISSION, 2, leaf.level, FaultClass.CD, ipa=ipa)
            return leaf.output_base + (ipa - leaf.input_base)

        return fetch

    def _descriptor_reader(self, sid: int) -> DescriptorReader:
        reader = self._readers.get(sid)
        if reader is not None:
            return reader
        initiator = Initiator(InitiatorKind.SMMU, self.smmu.name, stream_id=sid, purpose="walk")
        bus = self.smmu.bus
        read = bus.read
        read_int = bus.ram.read_int
        # RAM known now, as [first, last] descriptor addresses; anything else takes the full path.
        ram = tuple((r.base, r.end - 8) for r in bus.ram_regions())

        def read_desc(pa: int) -> int | ExternalAbort:
            # Hot path (DESIGN rule 9): with nobody observing the bus, a RAM read is exactly what
            # SystemBus.read would return; with observers every read goes through the bus (rule 4).
            if not bus.observers:
                for first, last in ram:
                    if first <= pa <= last:
                        return read_int(pa, 8)
            return read(initiator, pa, 8)

        self._readers[sid] = read_desc
        return read_desc

    # -- faults and events ------------------------------------------------------------------------
    @staticmethod
    def _config_fault(fault: ConfigFault) -> _Fault:
        if fault.s2_fault is not None:  # stage 2 failed while fetching a CD (CLASS=CD)
            s2 = fault.s2_fault
            return _Fault(s2.event_type, 2, FaultClass.CD, ipa=s2.ipa, fetch_address=s2.fetch_address)
        return _Fault(fault.event_type, fetch_address=fault.fetch_address, record=fault.recordable)

    def _report(self, txn: Transaction, fault: _Fault) -> TranslationResult:
        fields = {
            "SID": txn.stream_id,
            "SSV": int(txn.substream_id is not None),
            "SSID": txn.substream_id or 0,
            "INPUTADDR": txn.address,
            "RNW": int(not txn.is_write),
            "PNU": int(txn.privileged),
            "IND": int(txn.instruction and not txn.is_write),
            "S2": int(fault.stage == 2),
            "CLASS": int(fault.fault_class),
            "IPA": fault.ipa & ~(_PAGE_SIZE - 1),
            "FETCHADDR": fault.fetch_address & ~0x7,
        }
        if fault.event_type == EventType.F_BAD_ATS_TREQ:
            # The request's permissions (R is always 1 in PCIe; W = !NW) and one STU (§7.3.6).
            fields.update(R=1, W=int(txn.is_write), P=int(txn.privileged), X=int(txn.instruction), SPAN=1)
        if fault.event_type == EventType.F_PERMISSION and fault.fault_class == FaultClass.TT:
            fields["TTRNW"] = 1  # the faulting access was a descriptor read
        allowed = EVENT_FIELDS[fault.event_type]
        record = build_event(fault.event_type, **{k: v for k, v in fields.items() if k in allowed})
        # Stage-2 faults always abort (A is fixed to 1); stage-1 faults follow CD.A.
        outcome = Outcome.ABORT if fault.abort or fault.stage == 2 else Outcome.RAZ_WI
        # A Translation Request records nothing (§3.9.1.2, §7.3.6): translation faults become a
        # response without permissions, configuration errors a Completer Abort.
        answering_ats = self._answering_ats
        if answering_ats and fault.event_type not in _TRANSLATION_FAULTS:
            self._ats_config_error = True
        record_it = fault.record and not answering_ats
        recorded = self.smmu.record_event(record) if record_it else False
        trace = self.smmu.trace
        if trace is not None and trace.enabled:
            trace.emit(
                self.smmu.name,
                "fault",
                event=fault.event_type.name,
                sid=txn.stream_id,
                ssid=txn.substream_id,
                address=txn.address,
                write=txn.is_write,
                outcome=outcome.value,
                recorded=recorded,
            )
        return TranslationResult(outcome, 0, record if record_it else None)

    # -- ATS Translation Requests -------------------------------------------------------------------
    def ats_request(
        self, sid: int, ssid: int | None, address: int, is_write: bool, privileged: bool = False
    ) -> AtsResponse:
        """Answer a Translation Request per the effective STE.EATS (IHI 0070 §3.9.1.2). Translation
        faults come back in the response (no permissions), configuration errors complete with CA;
        neither is recorded (SMMU_CR2.REC_CFG_ATS is not implemented). A refused request (SMMUEN=0,
        effective EATS=0b00) completes with UR and records F_BAD_ATS_TREQ."""
        smmu = self.smmu
        if not smmu.features.ats:
            return AtsResponse(AtsStatus.UNSUPPORTED_REQUEST)
        txn = Transaction(sid, address & ~(_PAGE_SIZE - 1), _PAGE_SIZE, is_write, ssid, privileged)
        if not smmu.smmu_enabled:
            self._report(txn, _Fault(EventType.F_BAD_ATS_TREQ))
            return AtsResponse(AtsStatus.UNSUPPORTED_REQUEST)
        stream = smmu.config_cache.lookup_stream(sid)
        if isinstance(stream, ConfigFault) or stream.illegal is not None:
            return AtsResponse(AtsStatus.COMPLETER_ABORT)
        if stream.config == SteConfig.ABORT:
            return AtsResponse(AtsStatus.UNSUPPORTED_REQUEST)  # silently (STE.Config == 0b000)
        eats = self._effective_eats(stream)
        if eats == Eats.ABT:
            self._report(txn, _Fault(EventType.F_BAD_ATS_TREQ))
            return AtsResponse(AtsStatus.UNSUPPORTED_REQUEST)
        self._ats_config_error = False
        self._ats_ipa = txn.address  # stage 1 skipped: an identity-mapped completion
        read = self._ats_probe(txn, stream, False)
        ipa = self._ats_ipa
        write = self._ats_probe(txn, stream, True)
        if self._ats_config_error:
            return AtsResponse(AtsStatus.COMPLETER_ABORT)
        if read.outcome is not Outcome.OK:
            if write.outcome is not Outcome.OK:
                return AtsResponse(AtsStatus.SUCCESS, 0, _PAGE_SIZE)
            ipa = self._ats_ipa
        ok = read if read.outcome is Outcome.OK else write
        # Split-stage ATS completes with the stage-1 output (an IPA) that stage 2 translates later.
        return AtsResponse(
            AtsStatus.SUCCESS,
            ipa if eats == Eats.S1CHK else ok.output_address,
            _PAGE_SIZE,
            readable=read.outcome is Outcome.OK,
            writable=write.outcome is Outcome.OK,
        )

    def _ats_probe(self, txn: Transaction, stream: StreamConfig, is_write: bool) -> TranslationResult:
        probe = Transaction(txn.stream_id, txn.address, txn.size, is_write, txn.substream_id, txn.privileged)
        self._answering_ats = True
        try:
            return self._translate_stream(probe, stream)
        finally:
            self._answering_ats = False

    # -- prefetch ----------------------------------------------------------------------------------
    def prefetch_config(self, sid: int, ssid: int | None) -> None:
        """Fetch and cache an STE and, when it uses stage 1, its CD; never reports anything."""
        cache = self.smmu.config_cache
        stream = cache.lookup_stream(sid)
        if isinstance(stream, ConfigFault) or stream.illegal is not None or not stream.s1:
            return
        index = self._cd_index(stream, ssid)
        if isinstance(index, int):
            cache.lookup_context(stream, index, self._cd_fetch_through_s2(stream) if stream.s2 else None)


def _failing_stage(entry: TlbEntry, is_write: bool, privileged: bool, instruction: bool) -> int:
    """0 when the access is permitted, else the stage (1 or 2) whose permission check fails.

    The same rules as ``walk.check_permission``, applied to a cached (possibly combined) entry.
    """
    if is_write:
        stage1 = entry.writable and (privileged or entry.unpriv)
        stage2 = entry.s2_writable
    elif instruction:
        stage1 = entry.priv_executable if privileged else entry.executable
        stage2 = entry.s2_executable
    else:
        stage1 = entry.readable and (privileged or entry.unpriv)
        stage2 = entry.s2_readable
    if not stage1:
        return 1
    return 0 if stage2 else 2


def _effective_attributes(txn: Transaction, stream: StreamConfig) -> tuple[bool, bool]:
    """PRIVCFG / INSTCFG overrides of the incoming PnU / InD (writes are always data)."""
    privileged = txn.privileged if stream.privcfg < 2 else stream.privcfg == 3
    instruction = txn.instruction if stream.instcfg < 2 else stream.instcfg == 3
    return privileged, instruction and not txn.is_write


def _s2_is_device(memattr: int) -> bool:
    return memattr >> 2 == 0  # stage-2 MemAttr[3:2] == 0b00: Device memory


def _split_at_pages(txn: Transaction) -> list[Transaction]:
    """Split a DMA into transactions that do not cross a 4 KiB boundary (as PCIe requires)."""
    parts = []
    address, remaining = txn.address, max(txn.size, 0)
    while remaining > 0:
        chunk = min(remaining, _PAGE_SIZE - (address & (_PAGE_SIZE - 1)))
        parts.append(replace(txn, address=address, size=chunk))
        address += chunk
        remaining -= chunk
    return parts
