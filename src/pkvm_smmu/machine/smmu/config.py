"""Configuration fetch and the configuration cache (IHI 0070 §3.3, §5, §3.21).

The stream table (linear or two-level, exact Span semantics) and CD tables (linear or two-level)
are read through the bus as the SMMU's own accesses. Whatever is fetched, valid or not, is cached
until the architected CFGI command removes it; failed fetches (aborts) are not cached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pkvm_smmu.arch.events import EventType
from pkvm_smmu.arch.registers import CR2, STRTAB_BASE, STRTAB_BASE_CFG, StrtabFmt
from pkvm_smmu.arch.strtab import CD_SIZE, L1CD, L1CD_SIZE, L1STD, L1STD_SIZE, STE_SIZE
from pkvm_smmu.machine.bus import ExternalAbort, Initiator, InitiatorKind
from pkvm_smmu.machine.smmu.decode import ContextConfig, StreamConfig, decode_cd, decode_ste
from pkvm_smmu.machine.smmu.types import WalkFault

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

_SPLIT_VALUES = (6, 8, 10)


@dataclass(frozen=True, slots=True)
class ConfigFault:
    """A configuration lookup that ended in an event (or a silent abort when not ``recordable``)."""

    event_type: EventType
    fetch_address: int = 0
    recordable: bool = True
    # A stage-2 fault while fetching a CD through stage 2 (CLASS=CD, S2=1).
    s2_fault: WalkFault | None = None


# Translate a CD-table IPA to a PA through the stream's stage 2 (nested streams only).
S2Fetch = Callable[[int], "int | WalkFault"]


class ConfigCache:
    """The SMMU's STE/L1STD and CD/L1CD caches, with the fetches that fill them."""

    def __init__(self, smmu: SmmuV3) -> None:
        self.smmu = smmu
        self._l1std: dict[int, tuple[int, int]] = {}  # L1 index -> (L1STD, its PA)
        self._ste: dict[int, StreamConfig] = {}
        self._l1cd: dict[tuple[int, int], tuple[int, int]] = {}  # (sid, L1 index) -> (L1CD, PA)
        self._cd: dict[tuple[int, int], ContextConfig] = {}  # (sid, CD index)
        self.generation = 0  # bumped by every invalidation, for derived lookup accelerators
        # Called after every invalidation, before any eager prefetch: derived accelerators (the
        # translator's micro-TLB) drop what they built from the cache without a check per hit.
        self._invalidation_listeners: list[Callable[[], None]] = []
        self._known_sids: set[int] = set()
        self._initiators: dict[tuple[int, str], Initiator] = {}

    def add_invalidation_listener(self, listener: Callable[[], None]) -> None:
        self._invalidation_listeners.append(listener)

    # -- fetch ------------------------------------------------------------------------------
    def _initiator(self, sid: int, purpose: str) -> Initiator:
        key = (sid, purpose)
        initiator = self._initiators.get(key)
        if initiator is None:
            initiator = Initiator(InitiatorKind.SMMU, self.smmu.name, stream_id=sid, purpose=purpose)
            self._initiators[key] = initiator
        return initiator

    def lookup_stream(self, sid: int) -> StreamConfig | ConfigFault:
        cached = self._ste.get(sid)
        if cached is not None:
            return cached
        result = self._fetch_stream(sid)
        if isinstance(result, StreamConfig) and self.smmu.smmu_enabled:
            self._ste[sid] = result
            self._known_sids.add(sid)
        return result

    def _fetch_stream(self, sid: int) -> StreamConfig | ConfigFault:
        smmu = self.smmu
        features = smmu.features
        cfg = smmu.strtab_base_cfg
        base = STRTAB_BASE.ADDR.get_address(smmu.strtab_base)
        log2size = min(STRTAB_BASE_CFG.LOG2SIZE.get(cfg), features.sid_bits)
        recinvsid = bool(CR2.RECINVSID.get(smmu.cr2))
        bad_sid = ConfigFault(EventType.C_BAD_STREAMID, recordable=recinvsid)
        if sid >> log2size:
            return bad_sid
        bus = smmu.bus
        initiator = self._initiator(sid, "strtab")
        two_level = STRTAB_BASE_CFG.FMT.get(cfg) == StrtabFmt.TWO_LEVEL and features.two_level_strtab
        if not two_level:
            base &= ~((1 << log2size) * STE_SIZE - 1)
            ste_address = base + sid * STE_SIZE
            sources: tuple[int, ...] = (ste_address,)
        else:
            split = STRTAB_BASE_CFG.SPLIT.get(cfg)
            if split not in _SPLIT_VALUES:
                split = 6
            split = min(split, log2size)
            l1_index = sid >> split
            base &= ~(max(1, 1 << (log2size - split)) * L1STD_SIZE - 1)
            l1std, l1_address = self._l1std.get(l1_index, (None, 0))
            if l1std is None:
                l1_address = base + l1_index * L1STD_SIZE
                value = bus.read(initiator, l1_address, L1STD_SIZE)
                if isinstance(value, ExternalAbort):
                    return ConfigFault(EventType.F_STE_FETCH, fetch_address=l1_address)
                l1std = value
                if smmu.smmu_enabled:
                    self._l1std[l1_index] = (l1std, l1_address)
            span = L1STD.SPAN.get(l1std)
            if span == 0 or span > split + 1:  # invalid, or reserved/oversized span
                return bad_sid
            l2_index = sid & ((1 << split) - 1)
            if l2_index >= 1 << (span - 1):
                return bad_sid
            l2_base = L1STD.L2PTR.get_address(l1std) & ~((1 << (span - 1)) * STE_SIZE - 1)
            ste_address = l2_base + l2_index * STE_SIZE
            sources = (l1_address, ste_address)
        raw = bus.read_bytes(initiator, ste_address, STE_SIZE)
        if isinstance(raw, ExternalAbort):
            return ConfigFault(EventType.F_STE_FETCH, fetch_address=ste_address)
        return decode_ste(sid, int.from_bytes(raw, "little"), ste_address, sources, features)

    def lookup_context(
        self, stream: StreamConfig, index: int, s2_fetch: S2Fetch | None
    ) -> ContextConfig | ConfigFault:
        """The CD at ``index`` of the stream's CD table (index already range-checked by the caller)."""
        key = (stream.sid, index)
        cached = self._cd.get(key)
        if cached is not None:
            return cached
        result = self._fetch_context(stream, index, s2_fetch)
        if isinstance(result, ContextConfig) and self.smmu.smmu_enabled:
            self._cd[key] = result
        return result

    def _to_pa(self, ipa_or_pa: int, s2_fetch: S2Fetch | None) -> int | ConfigFault:
        if s2_fetch is None:
            return ipa_or_pa
        pa = s2_fetch(ipa_or_pa)
        if isinstance(pa, WalkFault):
            return ConfigFault(pa.event_type, s2_fault=pa)
        return pa

    def _fetch_context(
        self, stream: StreamConfig, index: int, s2_fetch: S2Fetch | None
    ) -> ContextConfig | ConfigFault:
        bus = self.smmu.bus
        initiator = self._initiator(stream.sid, "cd-fetch")
        sources: tuple[int, ...] = ()
        table = stream.s1_context_ptr
        if stream.s1_cdmax and stream.s1_fmt:
            leaf_bits = 6 if stream.s1_fmt == 1 else 10
            l1_index = index >> leaf_bits
            l1_key = (stream.sid, l1_index)
            l1cd, l1_pa = self._l1cd.get(l1_key, (None, 0))
            if l1cd is None:
                l1_table = table & ~(max(1, 1 << max(0, stream.s1_cdmax - leaf_bits)) * L1CD_SIZE - 1)
                pa = self._to_pa(l1_table + l1_index * L1CD_SIZE, s2_fetch)
                if isinstance(pa, ConfigFault):
                    return pa
                value = bus.read(initiator, pa, L1CD_SIZE)
                if isinstance(value, ExternalAbort):
                    return ConfigFault(EventType.F_CD_FETCH, fetch_address=pa)
                l1cd, l1_pa = value, pa
                if self.smmu.smmu_enabled:
                    self._l1cd[l1_key] = (l1cd, l1_pa)
            if not L1CD.V.get(l1cd):
                return ConfigFault(EventType.C_BAD_SUBSTREAMID)
            sources = (l1_pa,)
            table = L1CD.L2PTR.get_address(l1cd)
            index_in_table = index & ((1 << leaf_bits) - 1)
        else:
            table &= ~((1 << stream.s1_cdmax) * CD_SIZE - 1)
            index_in_table = index
        cd_pa = self._to_pa(table + index_in_table * CD_SIZE, s2_fetch)
        if isinstance(cd_pa, ConfigFault):
            return cd_pa
        raw = bus.read_bytes(initiator, cd_pa, CD_SIZE)
        if isinstance(raw, ExternalAbort):
            return ConfigFault(EventType.F_CD_FETCH, fetch_address=cd_pa)
        return decode_cd(
            stream.sid,
            index,
            int.from_bytes(raw, "little"),
            cd_pa,
            (*sources, cd_pa),
            self.smmu.features,
            stream.world,
        )

    # -- invalidation (CMD_CFGI_*) ------------------------------------------------------------
    def invalidate_ste(self, sid: int, leaf: bool) -> None:
        """CFGI_STE: the STE and every CD cached through it; Leaf=0 also the L1STD walked to it."""
        self._ste.pop(sid, None)
        self._drop_cds(lambda key_sid: key_sid == sid)
        if not leaf:
            self._drop_l1std(lambda l1_index, split: l1_index == sid >> split)
        self._invalidated([sid])

    def invalidate_ste_range(self, sid: int, range_: int) -> None:
        """CFGI_STE_RANGE: 2^(Range+1) SIDs from SID aligned down; Range=31 is CFGI_ALL."""
        if range_ >= 31:
            self.invalidate_all()
            return
        span = 1 << (range_ + 1)
        first = sid & ~(span - 1)
        last = first + span - 1
        for cached_sid in [s for s in self._ste if first <= s <= last]:
            del self._ste[cached_sid]
        self._drop_cds(lambda key_sid: first <= key_sid <= last)
        self._drop_l1std(lambda l1_index, split: first >> split <= l1_index <= last >> split)
        self._invalidated(range(first, last + 1) if span <= 4096 else sorted(self._known_sids))

    def invalidate_all(self) -> None:
        self._ste.clear()
        self._l1std.clear()
        self._cd.clear()
        self._l1cd.clear()
        self._invalidated(sorted(self._known_sids))

    def invalidate_cd(self, sid: int, ssid: int, leaf: bool) -> None:
        """CFGI_CD: the CD at index SSID cached through SID; Leaf=0 also its L1CD."""
        self._cd.pop((sid, ssid), None)
        if not leaf:
            for key in [k for k in self._l1cd if k[0] == sid]:
                stream = self._ste.get(sid)
                leaf_bits = 10 if stream is not None and stream.s1_fmt == 2 else 6
                if key[1] == ssid >> leaf_bits:
                    del self._l1cd[key]
        self._invalidated([sid])

    def invalidate_cd_all(self, sid: int) -> None:
        self._drop_cds(lambda key_sid: key_sid == sid)
        self._invalidated([sid])

    def prefetch(self, sid: int, ssid: int | None) -> None:
        """CMD_PREFETCH_CONFIG and eager prefetch: fetch and cache without reporting anything."""
        if self.smmu.smmu_enabled:
            self.smmu.translator.prefetch_config(sid, ssid)

    def _drop_cds(self, matches: Callable[[int], bool]) -> None:
        for key in [k for k in self._cd if matches(k[0])]:
            del self._cd[key]
        for key in [k for k in self._l1cd if matches(k[0])]:
            del self._l1cd[key]

    def _drop_l1std(self, matches: Callable[[int, int], bool]) -> None:
        split = STRTAB_BASE_CFG.SPLIT.get(self.smmu.strtab_base_cfg)
        split = split if split in _SPLIT_VALUES else 6
        for l1_index in [i for i in self._l1std if matches(i, split)]:
            del self._l1std[l1_index]

    def _invalidated(self, sids: Iterator[int] | range | list[int]) -> None:
        self.generation += 1
        for listener in self._invalidation_listeners:
            listener()
        if self.smmu.options.eager_config_prefetch:
            for sid in sids:
                if sid in self._known_sids:
                    self.prefetch(sid, None)

    # -- inspection (oracle, sanitizer, reports) --------------------------------------------------
    def cached_streams(self) -> list[StreamConfig]:
        return list(self._ste.values())

    def cached_contexts(self) -> list[ContextConfig]:
        return list(self._cd.values())

    def cached_l1std(self) -> dict[int, tuple[int, int]]:
        return dict(self._l1std)

    def cached_l1cd(self) -> dict[tuple[int, int], tuple[int, int]]:
        return dict(self._l1cd)
