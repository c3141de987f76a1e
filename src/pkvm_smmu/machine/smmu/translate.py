"""The SMMU's translation flow (IHI 0070 §3, reference card §6): bypass and GBPA, stream and
context lookup, stage 1 / stage 2 / nested translation through the TLB, fault recording, and ATS.

Device-facing entry points are ``translate``, ``dma_read``, ``dma_write`` and ``ats_request``.

Hot paths (DESIGN rule 9). A TLB hit is answered from the micro-TLB: a dict from (StreamID,
SubstreamID, page) to the architectural TLB entry that translated that page, used while the
entry is ``alive`` (still in the TLB). A miss on a stream whose configuration is cached skips the
configuration lookups and checks through a per-(StreamID, SubstreamID) plan, and walks with
``walk_raw`` straight into a positionally built ``TlbEntry``. Both accelerators are derived
state: they are dropped on every configuration invalidation and never change a result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

from pkvm_smmu.arch.events import EVENT_FIELDS, EventType, FaultClass, build_event
from pkvm_smmu.arch.registers import CR0, GBPA
from pkvm_smmu.arch.strtab import Eats, Instcfg, S1Dss, SteConfig
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
)
from pkvm_smmu.machine.smmu.walk import NO_RAM, RamView, walk_raw

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

_PAGE_SHIFT = 12
_PAGE_SIZE = 1 << _PAGE_SHIFT
_TOP_BYTE_MASK = (1 << 56) - 1
_TOP_BYTE = 0xFF << 56
_ALL_ONES_64 = (1 << 64) - 1
_SMMUEN = CR0.SMMUEN.in_place_mask
_INSTCFG_INSTR = int(Instcfg.INSTR)
_OK = Outcome.OK
_ABORT = TranslationResult(Outcome.ABORT)
_S1 = TranslationKind.S1
_S2 = TranslationKind.S2
_NESTED = TranslationKind.NESTED
_TRANSLATION_FAULTS = frozenset(
    {EventType.F_TRANSLATION, EventType.F_ADDR_SIZE, EventType.F_ACCESS, EventType.F_PERMISSION}
)
# Bounds on the derived accelerators: past these they are simply emptied and rebuilt.
_MICRO_TLB_MAX = 1 << 14
_PLANS_MAX = 1 << 12

DescriptorReader = Callable[[int], "int | ExternalAbort"]
IpaTranslator = Callable[[int], "int | WalkFault"]
# What a translation used, for verification tools: the transaction, the cached STE and CD (None
# where the flow did not need them), the TLB entry it hit or filled (None when it used none), and
# the result.
Observer = Callable[
    [Transaction, "StreamConfig | None", "ContextConfig | None", "TlbEntry | None", TranslationResult], None
]
# (stream, context, incoming, reader): a stream and SubstreamID whose checks all passed, the CD
# stage 1 uses (None: stage 2 only), whether PnU and InD are the incoming ones (no PRIVCFG or
# INSTCFG override: only then may the micro-TLB, which checks the incoming ones, answer), and the
# stream's descriptor reader.
_Plan = tuple[StreamConfig, "ContextConfig | None", bool, "DescriptorReader"]


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
        self._regs = smmu.regs
        self._bus = smmu.bus
        self._trace = smmu.trace
        # (sid, ssid, page) -> the TLB entry that translated the page; used while entry.alive.
        # Emptied on configuration invalidation and while an observer is set.
        self._micro_tlb: dict[tuple[int, int | None, int], TlbEntry] = {}
        self._plans: dict[tuple[int, int | None], _Plan] = {}
        self._observer: Observer | None = None
        # The cached structures the translation in progress used (for the observer).
        self._used_stream: StreamConfig | None = None
        self._used_context: ContextConfig | None = None
        self._used_entry: TlbEntry | None = None
        self._readers: dict[int, DescriptorReader] = {}  # per StreamID: descriptor reads of walks
        self._ram_view: RamView | None = None  # the RAM walks read inline when nobody observes
        self._device_initiators: dict[tuple[int, int | None], Initiator] = {}
        self._answering_ats = False
        # While answering a Translation Request: a configuration error was met (-> CA), and the
        # stage-1 output address (an IPA when nested: the split-stage ATS completion).
        self._ats_config_error = False
        self._ats_ipa = 0
        smmu.config_cache.add_invalidation_listener(self._config_invalidated)

    @property
    def observer(self) -> Observer | None:
        """Called after every ``translate`` (so every DMA part) with the cached structures it used.

        ATS Translation Requests are not reported (they access no memory; the device's later
        Translated transactions are). While set, the micro-TLB is bypassed so that every use of
        a TLB entry is seen; unset, it costs the hit path nothing.
        """
        return self._observer

    @observer.setter
    def observer(self, observer: Observer | None) -> None:
        self._observer = observer
        self._micro_tlb.clear()  # nothing is added back while an observer is set

    def _config_invalidated(self) -> None:
        self._micro_tlb.clear()
        self._plans.clear()

    # -- device-facing ------------------------------------------------------------------------
    def translate(self, txn: Transaction) -> TranslationResult:
        if self._regs.cr0ack & _SMMUEN and not txn.ats_translated:
            # Hot path: a micro-TLB hit is a dict probe and the entry's permission bits.
            if not txn.instruction:
                entry = self._micro_tlb.get((txn.stream_id, txn.substream_id, txn.address >> _PAGE_SHIFT))
                if (
                    entry is not None
                    and entry.alive
                    and (txn.privileged or entry.unpriv)
                    and (
                        (entry.writable and entry.s2_writable)
                        if txn.is_write
                        else (entry.readable and entry.s2_readable)
                    )
                ):
                    if self._trace.enabled:
                        self._trace_tlb(txn, True)
                    return TranslationResult(_OK, txn.address + entry.output_base - entry.input_base)
            result = self._translate_slow(txn)
        else:
            result = self._disabled_or_ats_translated(txn)
        observer = self._observer
        if observer is not None:
            observer(txn, self._used_stream, self._used_context, self._used_entry, result)
        return result

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

    def _trace_tlb(self, txn: Transaction, hit: bool) -> None:
        self._trace.emit(
            self.smmu.name,
            "tlb.hit" if hit else "tlb.miss",
            sid=txn.stream_id,
            ssid=txn.substream_id,
            address=txn.address,
        )

    def _trace_walk(self, sid: int, stage: int, path: tuple[int, ...]) -> None:
        """One table walk that reached a leaf: ``levels`` descriptors read (cost models count them)."""
        self._trace.emit(self.smmu.name, "walk", sid=sid, stage=stage, levels=len(path))

    # -- disabled, bypass, ATS Translated -------------------------------------------------------
    def _disabled_or_ats_translated(self, txn: Transaction) -> TranslationResult:
        self._used_stream = self._used_context = self._used_entry = None
        if not self._regs.cr0ack & _SMMUEN:
            return self._smmu_disabled(txn)
        return self._ats_translated(txn)

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
        self._used_stream = stream
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
        """An untranslated transaction with SMMUEN=1, below the micro-TLB."""
        plan = self._plans.get((txn.stream_id, txn.substream_id))
        if plan is not None:
            # The cached STE (and CD) and every check _translate_stream made still hold: no
            # invalidation happened since (it would have dropped the plan).
            stream = self._used_stream = plan[0]
            if plan[1] is not None:
                return self._stage1(txn, plan)  # sets _used_context and _used_entry
            self._used_context = None
            privileged, instruction = _effective_attributes(txn, stream)
            return self._stage2_only(txn, stream, privileged, instruction)
        self._used_stream = self._used_context = self._used_entry = None
        looked_up = self.smmu.config_cache.lookup_stream(txn.stream_id)
        if isinstance(looked_up, ConfigFault):
            return self._report(txn, self._config_fault(looked_up))
        self._used_stream = looked_up
        return self._translate_stream(txn, looked_up)

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
                self._used_context = context
                if context.illegal is not None:
                    return self._report(txn, _Fault(EventType.C_BAD_CD))
                return self._stage1(txn, self._plan(txn, stream, context))
            # S1DSS=BYPASS and no SubstreamID: stage 1 is skipped.
        if stream.s2:
            self._plan(txn, stream, None)
            return self._stage2_only(txn, stream, privileged, instruction)
        return TranslationResult(Outcome.OK, txn.address)

    def _plan(self, txn: Transaction, stream: StreamConfig, context: ContextConfig | None) -> _Plan:
        sid = stream.sid
        plan = (stream, context, stream.privcfg < 2 and stream.instcfg < 2, self._descriptor_reader(sid))
        # Kept only for what the configuration cache holds (it caches nothing while SMMUEN=0).
        if self._regs.cr0ack & _SMMUEN:
            plans = self._plans
            if len(plans) >= _PLANS_MAX:
                plans.clear()
            plans[(sid, txn.substream_id)] = plan
        return plan

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
    def _stage1(self, txn: Transaction, plan: _Plan) -> TranslationResult:
        stream, context, incoming, reader = plan
        assert context is not None
        self._used_context = context
        if incoming:
            privileged = txn.privileged
            instruction = txn.instruction and not txn.is_write
        else:
            privileged, instruction = _effective_attributes(txn, stream)
        va = txn.address
        # With TBI the top byte is ignored: treat it as the sign extension of bit 55. EPDx (no
        # walk), or an input in neither TTB0's nor TTB1's range, is a translation fault. The walk
        # takes the input reduced to the region (no TTB1 bits): region_base + reduced == tlb_va.
        if va >> 55 & 1:
            walk_cfg = context.ttb1
            tlb_va = (va & _TOP_BYTE_MASK) | _TOP_BYTE if context.tbi1 else va
            input_bits = 0 if walk_cfg is None else walk_cfg.input_bits
            in_range = walk_cfg is not None and tlb_va >> input_bits == _ALL_ONES_64 >> input_bits
            reduced = tlb_va & ((1 << input_bits) - 1)
            region_base = tlb_va - reduced
        else:
            walk_cfg = context.ttb0
            tlb_va = va & _TOP_BYTE_MASK if context.tbi0 else va
            in_range = walk_cfg is not None and not tlb_va >> walk_cfg.input_bits
            reduced = tlb_va
            region_base = 0
        if not in_range:
            self._used_entry = None
            fault = _Fault(EventType.F_TRANSLATION, record=context.record, abort=context.abort)
            return self._report(txn, fault)
        assert walk_cfg is not None
        tlb = self.smmu.tlb
        nested = stream.s2
        entry = tlb.lookup(_NESTED if nested else _S1, stream.world, stream.vmid, context.asid, tlb_va)
        if self._trace.enabled:
            self._trace_tlb(txn, entry is not None)
        if entry is None:
            if nested:
                built = self._fill_nested(stream, context, walk_cfg, reduced, region_base, reader)
                if isinstance(built, _Fault):
                    self._used_entry = None
                    return self._report(txn, built)
                entry = built
            else:
                # Stage 1 only, the hottest miss: walked and cached here.
                view = self._ram_view
                ram = NO_RAM if view is None or self._bus.observers else view
                walked = walk_raw(walk_cfg, reduced, reader, None, ram)
                if isinstance(walked, WalkFault):
                    self._used_entry = None
                    return self._report(txn, _stage1_walk_fault(walked, stream, context))
                input_base, output_base, level, size, _, _, path, read, write, unpriv, x, px, glob, attr = (
                    walked
                )
                if self._trace.enabled:
                    self._trace_walk(stream.sid, 1, path)
                # Positional, in TlbEntry's field order: keywords cost as much as the walk's reads.
                entry = TlbEntry(
                    _S1, stream.world, stream.vmid, None if glob else context.asid,
                    region_base + input_base, size, output_base, read, write, unpriv, x, px, attr,
                    level, path, output_base,
                )  # fmt: skip
                tlb.insert(entry)
        self._used_entry = entry
        # The permission checks of walk.check_permission, on the (possibly combined) entry.
        if txn.is_write:
            stage1 = entry.writable and (privileged or entry.unpriv)
            stage2 = entry.s2_writable
        elif instruction:
            stage1 = entry.priv_executable if privileged else entry.executable
            stage2 = entry.s2_executable
        else:
            stage1 = entry.readable and (privileged or entry.unpriv)
            stage2 = entry.s2_readable
        if not stage1:
            return self._report(
                txn, _Fault(EventType.F_PERMISSION, record=context.record, abort=context.abort)
            )
        if not stage2:
            ipa = entry.ipa_base + (tlb_va - entry.input_base)
            return self._report(txn, _Fault(EventType.F_PERMISSION, 2, ipa=ipa, record=stream.s2_record))
        if self._answering_ats:
            self._ats_ipa = entry.ipa_base + (tlb_va - entry.input_base)
        # The micro-TLB answers with the entry's own offset (not for tagged, TBI, addresses) and
        # checks the incoming PnU and InD.
        if incoming and not instruction and tlb_va == va and self._observer is None:
            micro = self._micro_tlb
            if len(micro) >= _MICRO_TLB_MAX:
                micro.clear()
            micro[(txn.stream_id, txn.substream_id, va >> _PAGE_SHIFT)] = entry
        return TranslationResult(_OK, tlb_va + entry.output_base - entry.input_base)

    def _fill_nested(
        self,
        stream: StreamConfig,
        context: ContextConfig,
        walk_cfg: WalkConfig,
        reduced: int,
        region_base: int,
        reader: DescriptorReader,
    ) -> TlbEntry | _Fault:
        """Walk stage 1 with every table address through stage 2, then stage 2 for the output;
        cache the combined entry (stage-2 leaves are cached on the way)."""
        s2_sources: list[int] = []
        lookup_s2 = self.smmu.tlb.lookup_s2
        world, vmid, s2_ptw = stream.world, stream.vmid, stream.s2_ptw

        def translate_table(ipa: int) -> int | WalkFault:
            s2 = lookup_s2(world, vmid, ipa)
            if s2 is None:
                walked = self._s2_walk(stream, ipa)
                if isinstance(walked, WalkFault):
                    return walked
                s2 = walked
            s2_sources.extend(s2.sources)
            # A descriptor read needs stage-2 read permission; S2PTW also forbids Device memory.
            if not s2.readable or (s2_ptw and _s2_is_device(s2.attr)):
                return WalkFault(EventType.F_PERMISSION, 2, s2.level, FaultClass.TT, ipa=ipa)
            return s2.output_base + (ipa - s2.input_base)

        result = walk_raw(walk_cfg, reduced, reader, translate_table, self._ram())
        if isinstance(result, WalkFault):
            return _stage1_walk_fault(result, stream, context)
        input_base, output_base, level, s1_size, _, _, path, read, write, unpriv, x, px, glob, attr = result
        if self._trace.enabled:
            self._trace_walk(stream.sid, 1, path)
        ipa = output_base + (reduced - input_base)
        s2 = lookup_s2(world, vmid, ipa)
        if s2 is None:
            walked = self._s2_walk(stream, ipa)
            if isinstance(walked, WalkFault):
                return _Fault(
                    walked.event_type,
                    2,
                    FaultClass.IN,
                    ipa=ipa,
                    fetch_address=walked.fetch_address,
                    record=stream.s2_record,
                )
            s2 = walked
        # The combined entry covers the smaller of the two leaves.
        size = s1_size if s1_size < s2.size else s2.size
        ipa_base = ipa & -size
        entry = TlbEntry(
            _NESTED, world, vmid, None if glob else context.asid, region_base + (reduced & -size), size,
            s2.output_base + (ipa_base - s2.input_base), read, write, unpriv, x, px, attr, level,
            (*s2_sources, *path, *s2.sources), ipa_base, s2.readable, s2.writable, s2.executable,
            s1_size if s1_size > size else 0,
        )  # fmt: skip
        self.smmu.tlb.insert(entry)
        return entry

    # -- stage 2 -------------------------------------------------------------------------------
    def _s2_walk(self, stream: StreamConfig, ipa: int) -> TlbEntry | WalkFault:
        """Walk stage 2 for ``ipa`` (after a stage-2 TLB miss) and cache the leaf."""
        s2_walk = stream.s2_walk
        assert s2_walk is not None
        sid = stream.sid
        reader = self._readers.get(sid) or self._descriptor_reader(sid)
        result = walk_raw(s2_walk, ipa, reader, None, self._ram())
        if isinstance(result, WalkFault):
            return result
        input_base, output_base, level, size, _, _, path, readable, writable, _, x, _, _, attr = result
        if self._trace.enabled:
            self._trace_walk(sid, 2, path)
        entry = TlbEntry(
            _S2, stream.world, stream.vmid, None, input_base, size, output_base, readable, writable,
            True, x, x, attr, level, path, input_base,
        )  # fmt: skip
        self.smmu.tlb.insert(entry)
        return entry

    def _s2_entry(self, stream: StreamConfig, ipa: int) -> TlbEntry | WalkFault:
        """The stage-2 entry translating ``ipa``: a TLB hit, or a walk that fills the TLB."""
        entry = self.smmu.tlb.lookup_s2(stream.world, stream.vmid, ipa)
        return entry if entry is not None else self._s2_walk(stream, ipa)

    def _stage2_only(
        self, txn: Transaction, stream: StreamConfig, privileged: bool, instruction: bool
    ) -> TranslationResult:
        ipa = txn.address
        if ipa >> self.smmu.features.ias_bits:
            # Stage 1 bypassed: an input beyond IAS is a stage-1 address size fault.
            self._used_entry = None
            return self._report(txn, _Fault(EventType.F_ADDR_SIZE))
        entry = self.smmu.tlb.lookup_s2(stream.world, stream.vmid, ipa)
        if self._trace.enabled:
            self._trace_tlb(txn, entry is not None)
        if entry is None:
            walked = self._s2_walk(stream, ipa)
            if isinstance(walked, WalkFault):
                self._used_entry = None
                return self._report(
                    txn,
                    _Fault(
                        walked.event_type,
                        2,
                        FaultClass.IN,
                        ipa=ipa,
                        fetch_address=walked.fetch_address,
                        record=stream.s2_record,
                    ),
                )
            entry = walked
        self._used_entry = entry
        # walk.check_permission at stage 2: writes need S2AP W, fetches XN clear, reads S2AP R.
        permitted = entry.writable if txn.is_write else entry.executable if instruction else entry.readable
        if not permitted:
            return self._report(txn, _Fault(EventType.F_PERMISSION, 2, ipa=ipa, record=stream.s2_record))
        # INSTCFG: reads that are instruction fetches must not be answered by the micro-TLB.
        if (
            not instruction
            and not txn.ats_translated
            and stream.instcfg != _INSTCFG_INSTR
            and self._observer is None
        ):
            micro = self._micro_tlb
            if len(micro) >= _MICRO_TLB_MAX:
                micro.clear()
            micro[(txn.stream_id, txn.substream_id, ipa >> _PAGE_SHIFT)] = entry
        return TranslationResult(_OK, ipa + entry.output_base - entry.input_base)

    def _cd_fetch_through_s2(self, stream: StreamConfig) -> IpaTranslator:
        def fetch(ipa: int) -> int | WalkFault:
            entry = self._s2_entry(stream, ipa)
            if isinstance(entry, WalkFault):
                fault = entry
                return WalkFault(fault.event_type, 2, fault.level, FaultClass.CD, ipa, fault.fetch_address)
            if not entry.readable:
                return WalkFault(EventType.F_PERMISSION, 2, entry.level, FaultClass.CD, ipa=ipa)
            return entry.output_base + (ipa - entry.input_base)

        return fetch

    def _descriptor_reader(self, sid: int) -> DescriptorReader:
        reader = self._readers.get(sid)
        if reader is not None:
            return reader
        initiator = Initiator(InitiatorKind.SMMU, self.smmu.name, stream_id=sid, purpose="walk")
        read = self.smmu.bus.read

        def read_desc(pa: int) -> int | ExternalAbort:
            return read(initiator, pa, 8)

        self._readers[sid] = read_desc
        if self._ram_view is None:
            # The largest RAM region known at the first walk; other reads take the bus.
            bus = self.smmu.bus
            regions = bus.ram_regions()
            if regions:
                ram = max(regions, key=lambda r: r.size)
                self._ram_view = (bus.ram.page_if_backed, ram.base, ram.end - 8)
        return read_desc

    def _ram(self) -> RamView:
        """What walks may read inline (DESIGN rule 9): with nobody observing the bus, a read of
        RAM is exactly what SystemBus.read returns; with observers every read goes through the
        bus (rule 4). Valid after a ``_descriptor_reader`` call."""
        view = self._ram_view
        return NO_RAM if view is None or self._bus.observers else view

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


def _effective_attributes(txn: Transaction, stream: StreamConfig) -> tuple[bool, bool]:
    """PRIVCFG / INSTCFG overrides of the incoming PnU / InD (writes are always data)."""
    privileged = txn.privileged if stream.privcfg < 2 else stream.privcfg == 3
    instruction = txn.instruction if stream.instcfg < 2 else stream.instcfg == 3
    return privileged, instruction and not txn.is_write


def _s2_is_device(memattr: int) -> bool:
    return memattr >> 2 == 0  # stage-2 MemAttr[3:2] == 0b00: Device memory


def _split_at_pages(txn: Transaction) -> list[Transaction]:
    """Split a DMA into transactions that do not cross a 4 KiB boundary (as PCIe requires)."""
    if 0 < txn.size <= _PAGE_SIZE - (txn.address & (_PAGE_SIZE - 1)):
        return [txn]  # the usual case: nothing to split
    parts = []
    address, remaining = txn.address, max(txn.size, 0)
    while remaining > 0:
        chunk = min(remaining, _PAGE_SIZE - (address & (_PAGE_SIZE - 1)))
        parts.append(replace(txn, address=address, size=chunk))
        address += chunk
        remaining -= chunk
    return parts


def _stage1_walk_fault(fault: WalkFault, stream: StreamConfig, context: ContextConfig) -> _Fault:
    if fault.stage == 2:  # a stage-1 descriptor's IPA failed stage 2 (CLASS=TT)
        return _Fault(
            fault.event_type,
            2,
            FaultClass.TT,
            ipa=fault.ipa,
            fetch_address=fault.fetch_address,
            record=stream.s2_record,
        )
    fault_class = FaultClass.TT if fault.event_type == EventType.F_WALK_EABT else FaultClass.IN
    return _Fault(
        fault.event_type,
        1,
        fault_class,
        fetch_address=fault.fetch_address,
        record=context.record,
        abort=context.abort,
    )
