"""Check 1: a translation or configuration used from a cache entry whose memory changed without the
invalidation the architecture requires, completed by a later CMD_SYNC.

Every cached entry the SMMU model hands the translation observer (an STE, a CD, a TLB entry) is
tracked from its first use with the values of the words it was built from (what the SMMU read
there, seen on the bus). A write to one of those words marks it; a use of a marked entry compares
the words with memory, on the bits that matter (the used bits of an STE or CD; every descriptor bit
but the software-defined [58:55]). A TLB entry also remembers the STE and CD fields it was built
under: using it under different ones (a CD's TTB or ASID changed, an ASID reused, a VMID's stage 2
changed) is stale use too.

An entry the SMMU dropped on a consumed CFGI/TLBI is not yet gone as far as the architecture is
concerned: until a CMD_SYNC is consumed after that command, a translation it would have served may
still use it. Such translations are reported when the dropped entry was stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pkvm_smmu.arch.commands import CMD_SIZE, pretty_command
from pkvm_smmu.arch.queues import q_slot, q_used
from pkvm_smmu.arch.registers import CMDQ_CONS, Reg
from pkvm_smmu.machine.bus import Access
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.machine.smmu.decode import ContextConfig, StreamConfig
from pkvm_smmu.machine.smmu.tlb import WORLD_EL1, TlbEntry
from pkvm_smmu.machine.smmu.types import Transaction, TranslationKind, TranslationResult
from pkvm_smmu.smmu_lib.entry import cd_used, ste_update_safe, ste_used
from pkvm_smmu.verify.sanitizer._commands import CommandDecoder, ConfigScope
from pkvm_smmu.verify.sanitizer._context import RunContext, read_entry, read_u64
from pkvm_smmu.verify.sanitizer._report import Check, Location, SanitizerReport

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

_DESCRIPTOR_MEANINGFUL = ((1 << 64) - 1) & ~(0xF << 55)  # bits [58:55] are for software
_WORD_MASK = (1 << 64) - 1
_ENTRY_WORDS = 8
_QUEUE_SCAN_MAX = 1 << 12  # queued commands examined when naming what is missing
_FETCH_PURPOSES = frozenset({"strtab", "cd-fetch", "walk"})


def _words(address: int, count: int) -> list[int]:
    return [address + 8 * i for i in range(count)]


def _entry_words(value: int) -> list[int]:
    return [(value >> (64 * i)) & _WORD_MASK for i in range(_ENTRY_WORDS)]


@dataclass(eq=False)
class _Tracked:
    """One cached entry the sanitizer has seen used, and what it was built from."""

    entry: StreamConfig | ContextConfig | TlbEntry
    structure: str
    built_from: dict[int, int]  # word PA -> value the entry was built from
    invalidation: str  # the command that removes it
    sid: int = -1
    cd_index: int = -1
    # TLB entries: the STE (stage 2) and CD fields it was built under, with their sources.
    stream_fields: tuple[object, ...] | None = None
    context_fields: tuple[object, ...] | None = None
    stream_address: int = 0
    context_address: int = 0
    dirty: bool = False
    reported: bool = False
    # Dropped by this consumed command; architecturally present until a CMD_SYNC follows it.
    dropped_by: str = ""
    dropped_at: Location | None = None


def _stream_fields(stream: StreamConfig | None) -> tuple[object, ...] | None:
    """What a stage-2 (or nested) TLB entry caches of its STE."""
    if stream is None or not stream.s2:
        return None
    return (stream.world, stream.vmid, stream.s2_walk)


def _context_fields(context: ContextConfig | None) -> tuple[object, ...] | None:
    """What a stage-1 (or nested) TLB entry caches of its CD."""
    if context is None:
        return None
    return (context.asid, context.ttb0, context.ttb1, context.tbi0, context.tbi1, context.mair)


def _describe_tlb(entry: TlbEntry) -> str:
    tags = f"{entry.world}"
    if entry.world == WORLD_EL1:
        tags += f" VMID={entry.vmid}"
    if entry.kind is not TranslationKind.S2:
        tags += " global" if entry.asid is None else f" ASID={entry.asid}"
    space = "IPA" if entry.kind is TranslationKind.S2 else "VA"
    return (
        f"TLB entry {entry.kind.name} {tags} {space} {entry.input_base:#x}+{entry.size:#x}"
        f" -> {entry.output_base:#x}"
    )


def _tlb_invalidation(entry: TlbEntry) -> str:
    if entry.kind is TranslationKind.S2:
        return f"CMD_TLBI_S2_IPA VMID={entry.vmid} ADDR={entry.input_base:#x}"
    if entry.world != WORLD_EL1:
        if entry.asid is None:
            return f"CMD_TLBI_EL2_VAA ADDR={entry.input_base:#x}"
        return f"CMD_TLBI_EL2_VA ASID={entry.asid} ADDR={entry.input_base:#x}"
    if entry.asid is None:
        by_va = f"CMD_TLBI_NH_VAA VMID={entry.vmid} ADDR={entry.input_base:#x}"
    else:
        by_va = f"CMD_TLBI_NH_VA VMID={entry.vmid} ASID={entry.asid} ADDR={entry.input_base:#x}"
    if entry.kind is TranslationKind.NESTED:
        return f"{by_va} (stage 1) or CMD_TLBI_S12_VMALL VMID={entry.vmid} (stage 2)"
    return by_va


def _context_invalidation(entry: TlbEntry, old_asid: int | None) -> str:
    """What removes the entries cached under a CD's old fields (by ASID; global ones need more)."""
    by_asid = entry.asid is not None and old_asid is not None
    if entry.world != WORLD_EL1:
        return f"CMD_TLBI_EL2_ASID ASID={old_asid}" if by_asid else "CMD_TLBI_EL2_ALL"
    if by_asid:
        return f"CMD_TLBI_NH_ASID VMID={entry.vmid} ASID={old_asid}"
    return f"CMD_TLBI_NH_ALL VMID={entry.vmid}"


class StaleUseCheck:
    """Check 1 on one SMMU."""

    def __init__(self, run: RunContext, smmu: SmmuV3, decoder: CommandDecoder) -> None:
        self.run = run
        self.smmu = smmu
        self.decoder = decoder
        # Every word the SMMU read to build configuration or translations: its last value read.
        self._fetched: dict[int, int] = {}
        self._fetched_pages: dict[int, set[int]] = {}
        self._last_write: dict[int, Location] = {}
        self._tracked: dict[int, _Tracked] = {}  # id(entry) -> tracking
        self._users: dict[int, list[_Tracked]] = {}  # word -> tracked entries built from it
        self._dropped: list[_Tracked] = []  # dropped by a consumed invalidation, no CMD_SYNC since

    # -- bus ---------------------------------------------------------------------------------------
    def smmu_read(self, access: Access) -> None:
        """Remember what the SMMU read where (STE, CD, L1 descriptors, table descriptors)."""
        if access.aborted or access.initiator.purpose not in _FETCH_PURPOSES:
            return
        value = access.value
        if isinstance(value, bytes):
            base = access.address
            for offset in range(0, len(value) - 7, 8):
                self._remember(base + offset, int.from_bytes(value[offset : offset + 8], "little"))
        elif isinstance(value, int) and access.size == 8:
            self._remember(access.address, value)

    def _remember(self, word: int, value: int) -> None:
        self._fetched[word] = value
        pfn = word >> PAGE_SHIFT
        words = self._fetched_pages.get(pfn)
        if words is None:
            words = self._fetched_pages[pfn] = set()
        words.add(word)

    def write(self, access: Access, where: Location) -> None:
        """A store by anyone but the SMMU: note it against every word the SMMU has read there."""
        start = access.address
        end = start + access.size
        pages = self._fetched_pages
        for pfn in range(start >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1):
            words = pages.get(pfn)
            if not words:
                continue
            for word in words:
                if word + 8 <= start or word >= end:
                    continue
                self._last_write[word] = where
                for tracked in self._users.get(word, ()):
                    tracked.dirty = True

    # -- commands ----------------------------------------------------------------------------------
    def invalidation_consumed(self, command: int, where: Location) -> None:
        """An invalidation took effect: entries no longer cached wait for a CMD_SYNC."""
        if not self._tracked:
            return
        live: set[int] = set()
        live.update(id(e) for e in self.smmu.tlb.entries())
        cache = self.smmu.config_cache
        live.update(id(s) for s in cache.cached_streams())
        live.update(id(c) for c in cache.cached_contexts())
        text = pretty_command(command)
        for key, tracked in self._tracked.items():
            if key not in live and not tracked.dropped_by:
                tracked.dropped_by = text
                tracked.dropped_at = where
                self._dropped.append(tracked)

    def sync_consumed(self) -> None:
        """Every invalidation consumed before this CMD_SYNC has completed."""
        for tracked in self._dropped:
            self._forget(tracked)
        self._dropped = []

    def _forget(self, tracked: _Tracked) -> None:
        self._tracked.pop(id(tracked.entry), None)
        for word in tracked.built_from:
            users = self._users.get(word)
            if users is not None:
                users[:] = [u for u in users if u is not tracked]
                if not users:
                    del self._users[word]

    # -- translations ------------------------------------------------------------------------------
    def translation(
        self,
        txn: Transaction,
        stream: StreamConfig | None,
        context: ContextConfig | None,
        entry: TlbEntry | None,
        result: TranslationResult,
        at: Location,
    ) -> None:
        if stream is not None:
            self._use(self._track_stream(stream), at)
        if context is not None:
            self._use(self._track_context(context), at)
        if entry is not None:
            tracked = self._track_tlb(entry, stream, context)
            self._use(tracked, at)
            self._check_built_under(tracked, stream, context, at)
        if self._dropped:
            self._check_dropped(txn, stream, context, at)

    def _track(self, tracked: _Tracked) -> _Tracked:
        self._tracked[id(tracked.entry)] = tracked
        for word in tracked.built_from:
            self._users.setdefault(word, []).append(tracked)
        return tracked

    def _fetched_value(self, word: int) -> int:
        value = self._fetched.get(word)
        return read_u64(self.run.ram, word) if value is None else value

    def _track_stream(self, stream: StreamConfig) -> _Tracked:
        tracked = self._tracked.get(id(stream))
        if tracked is not None:
            return tracked
        built = dict(zip(_words(stream.address, _ENTRY_WORDS), _entry_words(stream.ste), strict=True))
        for source in stream.sources:
            if source != stream.address:  # the L1STD walked to it
                built[source] = self._fetched_value(source)
        return self._track(
            _Tracked(
                stream,
                f"STE sid={stream.sid:#x} @{stream.address:#x}",
                built,
                f"CMD_CFGI_STE SID={stream.sid:#x}",
                sid=stream.sid,
            )
        )

    def _track_context(self, context: ContextConfig) -> _Tracked:
        tracked = self._tracked.get(id(context))
        if tracked is not None:
            return tracked
        built = dict(zip(_words(context.address, _ENTRY_WORDS), _entry_words(context.cd), strict=True))
        for source in context.sources:
            if source != context.address:  # the L1CD walked to it
                built[source] = self._fetched_value(source)
        return self._track(
            _Tracked(
                context,
                f"CD sid={context.sid:#x} ssid={context.index:#x} @{context.address:#x}",
                built,
                f"CMD_CFGI_CD SID={context.sid:#x} SSID={context.index:#x}",
                sid=context.sid,
                cd_index=context.index,
            )
        )

    def _track_tlb(
        self, entry: TlbEntry, stream: StreamConfig | None, context: ContextConfig | None
    ) -> _Tracked:
        tracked = self._tracked.get(id(entry))
        if tracked is not None:
            return tracked
        built = {source: self._fetched_value(source) for source in entry.sources}
        stage1 = entry.kind is not TranslationKind.S2
        return self._track(
            _Tracked(
                entry,
                _describe_tlb(entry),
                built,
                _tlb_invalidation(entry),
                stream_fields=_stream_fields(stream),
                context_fields=_context_fields(context) if stage1 else None,
                stream_address=stream.address if stream is not None else 0,
                context_address=context.address if context is not None and stage1 else 0,
            )
        )

    # -- staleness ---------------------------------------------------------------------------------
    def _changed_words(self, tracked: _Tracked) -> list[int]:
        """Words whose memory differs from what the entry was built from, on the bits that matter."""
        ram = self.run.ram
        entry = tracked.entry
        if isinstance(entry, (StreamConfig, ContextConfig)):
            address = entry.address
            cached = entry.ste if isinstance(entry, StreamConfig) else entry.cd
            current = read_entry(ram, address)
            if isinstance(entry, StreamConfig):
                mask = ste_used(cached) & ~(ste_update_safe(cached, current) & ste_used(current))
            else:
                mask = cd_used(cached)
            diff = (cached ^ current) & mask
            changed = [address + 8 * i for i in range(_ENTRY_WORDS) if (diff >> (64 * i)) & _WORD_MASK]
            others = [w for w in tracked.built_from if not address <= w < address + 64]
            changed += [w for w in others if read_u64(ram, w) != tracked.built_from[w]]
            return changed
        return [
            word
            for word, value in tracked.built_from.items()
            if (read_u64(ram, word) ^ value) & _DESCRIPTOR_MEANINGFUL
        ]

    def _last_writer(self, words: list[int], fallback: int) -> Location:
        writes = [self._last_write[w] for w in words if w in self._last_write]
        if writes:
            return max(writes, key=lambda loc: (loc.seq, loc.time_ns))
        return Location(-1, -1, "unseen", words[0] if words else fallback, "no bus write seen")

    def _use(self, tracked: _Tracked, at: Location) -> None:
        if not tracked.dirty or tracked.reported:
            return
        changed = self._changed_words(tracked)
        if not changed:
            tracked.dirty = False  # written back to what it was
            return
        tracked.reported = True
        writer = self._last_writer(changed, 0)
        words = ", ".join(f"{w:#x}" for w in changed)
        self.run.add(
            SanitizerReport(
                Check.STALE_USE,
                self.smmu.name,
                tracked.structure,
                f"used from the cache after its memory changed (words {words}) with no invalidation",
                writer,
                at,
                self._missing(tracked, self._l1_changed(tracked, changed)),
            )
        )

    @staticmethod
    def _l1_changed(tracked: _Tracked, changed: list[int]) -> bool:
        entry = tracked.entry
        if isinstance(entry, (StreamConfig, ContextConfig)):
            return any(not entry.address <= w < entry.address + 64 for w in changed)
        return False

    def _check_built_under(
        self,
        tracked: _Tracked,
        stream: StreamConfig | None,
        context: ContextConfig | None,
        at: Location,
    ) -> None:
        """A TLB entry used under STE or CD fields other than those it was built under."""
        entry = tracked.entry
        if tracked.reported or not isinstance(entry, TlbEntry):
            return
        old_context, old_stream = tracked.context_fields, tracked.stream_fields
        new_context = _context_fields(context) if entry.kind is not TranslationKind.S2 else None
        if entry.asid is None and old_context is not None and new_context is not None:
            # A global entry serves every ASID: only the translation-table fields must agree.
            old_context, new_context = old_context[1:], new_context[1:]
        new_stream = _stream_fields(stream)
        if old_context is not None and new_context is not None and old_context != new_context:
            old_asid = tracked.context_fields[0] if tracked.context_fields else None
            assert context is not None
            sources = [tracked.context_address, context.address]
            what = (
                f"the CD @{context.address:#x} (ASID {context.asid}), whose fields differ from those of "
                f"the CD @{tracked.context_address:#x} (ASID {old_asid}) it was cached under"
            )
            missing = _context_invalidation(entry, old_asid if isinstance(old_asid, int) else None)
        elif old_stream is not None and new_stream is not None and old_stream != new_stream:
            assert stream is not None
            sources = [tracked.stream_address, stream.address]
            what = (
                f"the STE @{stream.address:#x}, whose stage-2 fields differ from those of the STE "
                f"@{tracked.stream_address:#x} it was cached under"
            )
            missing = f"CMD_TLBI_S12_VMALL VMID={entry.vmid}"
        else:
            return
        tracked.reported = True
        self.run.add(
            SanitizerReport(
                Check.STALE_USE,
                self.smmu.name,
                tracked.structure,
                f"used under {what}",
                self._structure_writer(sources),
                at,
                missing + " + CMD_SYNC",
            )
        )

    def _structure_writer(self, addresses: list[int]) -> Location:
        """The last write to the STE or CD the entry was built from, else to the one now used."""
        for address in addresses:
            words = [w for w in _words(address, _ENTRY_WORDS) if w in self._last_write]
            if words:
                return self._last_writer(words, address)
        return self._last_writer([], addresses[0])

    def _check_dropped(
        self,
        txn: Transaction,
        stream: StreamConfig | None,
        context: ContextConfig | None,
        at: Location,
    ) -> None:
        """A translation that an entry dropped without a CMD_SYNC since could still have served."""
        for tracked in self._dropped:
            if tracked.reported:
                continue
            if not self._would_serve(tracked, txn, stream, context):
                continue
            changed = self._changed_words(tracked)
            if not changed:
                continue
            tracked.reported = True
            writer = self._last_writer(changed, 0)
            assert tracked.dropped_at is not None
            self.run.add(
                SanitizerReport(
                    Check.STALE_USE,
                    self.smmu.name,
                    tracked.structure,
                    f"may still serve this translation: {tracked.dropped_by} was consumed "
                    f"(seq {tracked.dropped_at.seq}) but no CMD_SYNC after it",
                    writer,
                    at,
                    f"CMD_SYNC after {tracked.dropped_by}",
                )
            )

    @staticmethod
    def _would_serve(
        tracked: _Tracked, txn: Transaction, stream: StreamConfig | None, context: ContextConfig | None
    ) -> bool:
        entry = tracked.entry
        if isinstance(entry, StreamConfig):
            return entry.sid == txn.stream_id
        if isinstance(entry, ContextConfig):
            return entry.sid == txn.stream_id and entry.index == (txn.substream_id or 0)
        if stream is None or entry.world != stream.world:
            return False
        if entry.world == WORLD_EL1 and entry.vmid != stream.vmid:
            return False
        if not entry.input_base <= txn.address < entry.input_base + entry.size:
            return False
        if entry.kind is TranslationKind.S2:
            return stream.s2 and not stream.s1
        if entry.kind is TranslationKind.NESTED and not (stream.s1 and stream.s2):
            return False
        if entry.kind is TranslationKind.S1 and (not stream.s1 or stream.s2):
            return False
        return entry.asid is None or (context is not None and context.asid == entry.asid)

    # -- naming what is missing --------------------------------------------------------------------
    def _missing(self, tracked: _Tracked, l1: bool) -> str:
        """The invalidation the entry needed, or, when one is queued but not consumed, its CMD_SYNC."""
        queued = self._queued_invalidation(tracked, l1)
        if queued:
            return f"completion of {queued} (queued, not consumed: wait for a CMD_SYNC after it)"
        text = tracked.invalidation
        if l1:
            text += " Leaf=0"
        return text + " + CMD_SYNC"

    def _queued_invalidation(self, tracked: _Tracked, l1: bool) -> str:
        regs = self.smmu.regs
        log2 = regs.queue_log2size(Reg.CMDQ_BASE)
        prod = regs.read(Reg.CMDQ_PROD)
        cons = CMDQ_CONS.RD.get(regs.read(Reg.CMDQ_CONS))
        base = regs.queue_address(Reg.CMDQ_BASE, CMD_SIZE)
        entry = tracked.entry
        for n in range(min(q_used(prod, cons, log2), _QUEUE_SCAN_MAX)):
            address = base + q_slot(cons + n, log2) * CMD_SIZE
            command = int.from_bytes(self.run.ram.read(address, CMD_SIZE), "little")
            if isinstance(entry, TlbEntry):
                if self.decoder.removes_tlb_entry(command, entry):
                    return pretty_command(command)
                continue
            scope = self.decoder.config_scope(command)
            if scope is not None and self._scope_covers(scope, tracked, l1):
                return pretty_command(command)
        return ""

    @staticmethod
    def _scope_covers(scope: ConfigScope, tracked: _Tracked, l1: bool) -> bool:
        if isinstance(tracked.entry, StreamConfig):
            return scope.covers_ste(tracked.sid, l1=l1)
        return scope.covers_cd(tracked.sid, tracked.cd_index, l1=l1)


__all__ = ["StaleUseCheck"]
