"""The architectural TLB: cached translations, tagged as IHI 0070 §3.17 tags them, that stay until
a TLBI command removes them (DESIGN rule 3).

Like QEMU's smmu-common.c, this is generic: it knows translation kinds, worlds, VMIDs, ASIDs and
address ranges, not commands or STEs (the executor decodes CMD_TLBI_* into the calls below).

Every invalidation removes exactly the minimum scope the architecture requires (§4.4, reference
card §4/§7) and nothing more, so software that relies on a broader effect keeps stale entries.
The TLB holds leaf entries only (no walk cache), so Leaf=1 and Leaf=0 invalidations remove the
same entries. A combined stage 1+2 (NESTED) entry may be a fragment of a larger stage-1 block;
a TLBI by VA of any address in that block removes every fragment (the TLBI names the cached
stage-1 descriptor, not the fragment), hence ``TlbEntry.leaf_size``.

Index: per kind, VMID tag (EL2 ignores VMIDs), ASID tag (None = global) and entry size, a dict
from input base to entry. A hit costs a few dict probes; a VA/IPA invalidation probes the bases
its range covers, or scans one size bucket when that is smaller. An entry's ``alive`` is cleared
when it leaves the TLB, so accelerators that hold entries (the translator's micro-TLB) can check
one flag instead of being flushed by every invalidation or eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from pkvm_smmu.machine.smmu.types import TranslationKind

__all__ = ["WORLD_EL1", "WORLD_EL2", "Tlb", "TlbEntry"]

WORLD_EL1 = "el1"  # StreamWorld NS-EL1: entries tagged with VMID (and ASID at stage 1)
WORLD_EL2 = "el2"  # StreamWorld NS-EL2 / EL2-E2H: no VMID

_S1 = TranslationKind.S1
_S2 = TranslationKind.S2
_NESTED = TranslationKind.NESTED
_EL2_VM = -1  # VMID tag of every EL2 entry: never equal to a real VMID
_STAGE1_KINDS = (_S1, _NESTED)  # what the stage-1 (NH_*, EL2_*) commands address
_ALL_KINDS = (_S1, _S2, _NESTED)

# vm tag -> asid tag -> entry size -> input base -> entry
_Space = dict[int | None, dict[int, dict[int, "TlbEntry"]]]


@dataclass(slots=True, eq=False)
class TlbEntry:
    """One cached translation of ``[input_base, input_base + size)``."""

    kind: TranslationKind
    world: str  # WORLD_EL1 or WORLD_EL2
    vmid: int  # ignored for EL2 entries
    asid: int | None  # None: a global entry (matches every ASID); always None for S2 entries
    input_base: int  # VA (S1, NESTED) or IPA (S2), aligned to size
    size: int
    output_base: int  # PA (or the IPA for an S1 entry whose output is an IPA)
    readable: bool
    writable: bool
    unpriv: bool
    executable: bool
    priv_executable: bool
    attr: int
    level: int  # leaf level of the stage TLBIs address: stage 1 for S1/NESTED, stage 2 for S2
    sources: tuple[int, ...]  # every descriptor PA read to build the entry, both stages
    # NESTED entries: stage-1 output IPA of input_base, and the stage-2 permissions.
    ipa_base: int = 0
    s2_readable: bool = True
    s2_writable: bool = True
    s2_executable: bool = True
    # Size of the stage-1 leaf this entry was cut from, when larger than ``size`` (a NESTED entry
    # limited by a smaller stage-2 leaf); 0 means ``size``. TLBIs by VA match the whole leaf.
    leaf_size: int = 0
    seq: int = 0  # insertion order, set by Tlb.insert
    alive: bool = True  # set by Tlb.insert, cleared when the entry is invalidated, replaced or evicted


class Tlb:
    """Leaf translations, looked up by tags and address, removed only by invalidation."""

    __slots__ = ("_fragments", "_nested", "_order", "_s1", "_s2", "_seq", "capacity", "generation")

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 0:
            raise ValueError(f"TLB capacity must be >= 0 or None, got {capacity}")
        self.capacity = capacity
        # Incremented whenever entries may have been removed: keys derived lookup accelerators.
        self.generation = 0
        self._s1: dict[int, _Space] = {}
        self._s2: dict[int, _Space] = {}
        self._nested: dict[int, _Space] = {}
        # seq -> entry, oldest first. Eviction takes the oldest: an OrderedDict does that in O(1);
        # without a capacity a plain dict is cheaper.
        self._order: dict[int, TlbEntry] = OrderedDict() if capacity is not None else {}
        self._seq = 0
        # (kind, vm tag, asid tag, size) -> the largest leaf_size of fragments in that bucket
        self._fragments: dict[tuple[TranslationKind, int, int | None, int], int] = {}

    # -- lookup and fill ---------------------------------------------------------------------------
    def lookup(
        self, kind: TranslationKind, world: str, vmid: int, asid: int | None, address: int
    ) -> TlbEntry | None:
        """The entry translating ``address`` for these tags: S1/NESTED entries match the VMID and
        either the ASID or global; S2 entries match the VMID; EL2 entries ignore the VMID."""
        if kind is _S2:
            return self.lookup_s2(world, vmid, address)
        spaces = self._s1 if kind is _S1 else self._nested
        space = spaces.get(vmid if world == WORLD_EL1 else _EL2_VM)
        if space is None:
            return None
        by_size = space.get(asid)
        if by_size is not None:
            for size, table in by_size.items():
                entry = table.get(address & -size)
                if entry is not None:
                    return entry
        if asid is not None:
            by_size = space.get(None)
            if by_size is not None:
                for size, table in by_size.items():
                    entry = table.get(address & -size)
                    if entry is not None:
                        return entry
        return None

    def lookup_s2(self, world: str, vmid: int, address: int) -> TlbEntry | None:
        """``lookup`` of a stage-2 entry (the nested walk's table and output IPAs use it directly)."""
        space = self._s2.get(vmid if world == WORLD_EL1 else _EL2_VM)
        if space is not None:
            by_size = space.get(None)
            if by_size is not None:
                for size, table in by_size.items():
                    entry = table.get(address & -size)
                    if entry is not None:
                        return entry
        return None

    def insert(self, entry: TlbEntry) -> None:
        """Cache ``entry`` (it replaces an entry with the same tags and range); with a capacity,
        the oldest entries are evicted first."""
        kind = entry.kind
        vm = entry.vmid if entry.world == WORLD_EL1 else _EL2_VM
        if kind is _S2:
            tag = None
            spaces = self._s2
        else:
            tag = entry.asid
            spaces = self._s1 if kind is _S1 else self._nested
        # get-then-create: setdefault would build three throw-away dicts per fill.
        space = spaces.get(vm)
        if space is None:
            space = spaces[vm] = {}
        by_size = space.get(tag)
        if by_size is None:
            by_size = space[tag] = {}
        size = entry.size
        table = by_size.get(size)
        if table is None:
            table = by_size[size] = {}
        base = entry.input_base
        order = self._order
        old = table.get(base)
        if old is not None:
            old.alive = False
            del order[old.seq]
            self.generation += 1
        if entry.leaf_size > size:
            bucket = (kind, vm, tag, size)
            if entry.leaf_size > self._fragments.get(bucket, 0):
                self._fragments[bucket] = entry.leaf_size
        seq = self._seq = self._seq + 1
        entry.seq = seq
        entry.alive = True
        table[base] = entry
        order[seq] = entry
        capacity = self.capacity
        if capacity is not None and len(order) > capacity:
            while len(order) > capacity:
                self._remove(order.pop(next(iter(order))), ordered=False)  # the oldest
            self.generation += 1

    def entries(self) -> Iterator[TlbEntry]:
        """Every entry, oldest first (a snapshot: invalidating while iterating is safe)."""
        return iter(tuple(self._order.values()))

    def __len__(self) -> int:
        return len(self._order)

    # -- invalidation (IHI 0070 §4.4) ---------------------------------------------------------------
    def invalidate_nh_all(self, vmid: int) -> None:
        # CMD_TLBI_NH_ALL: every EL1 stage-1 (S1, NESTED) entry of the VMID, global ones included.
        self.generation += 1
        for kind in _STAGE1_KINDS:
            self._drop_space(kind, vmid)

    def invalidate_nh_asid(self, vmid: int, asid: int) -> None:
        # CMD_TLBI_NH_ASID: non-global EL1 stage-1 entries of the VMID and ASID (global entries stay).
        self.generation += 1
        for kind in _STAGE1_KINDS:
            self._drop_asid(kind, vmid, asid)

    def invalidate_nh_va(self, vmid: int, asid: int, address: int, size: int, leaf: bool, ttl: int) -> None:
        # CMD_TLBI_NH_VA: EL1 stage-1 entries of the VMID, of the ASID or global, covering the range.
        self.generation += 1
        for kind in _STAGE1_KINDS:
            self._drop_range(kind, vmid, (asid, None), address, size, ttl)

    def invalidate_nh_vaa(self, vmid: int, address: int, size: int, leaf: bool, ttl: int) -> None:
        # CMD_TLBI_NH_VAA: EL1 stage-1 entries of the VMID covering the range, any ASID or global.
        self.generation += 1
        for kind in _STAGE1_KINDS:
            self._drop_range(kind, vmid, None, address, size, ttl)

    def invalidate_el2_all(self) -> None:
        # CMD_TLBI_EL2_ALL: every EL2 (and EL2-E2H) entry.
        self.generation += 1
        for kind in _STAGE1_KINDS:
            self._drop_space(kind, _EL2_VM)

    def invalidate_el2_asid(self, asid: int) -> None:
        # CMD_TLBI_EL2_ASID: non-global EL2-E2H entries of the ASID.
        self.generation += 1
        for kind in _STAGE1_KINDS:
            self._drop_asid(kind, _EL2_VM, asid)

    def invalidate_el2_va(self, asid: int, address: int, size: int, leaf: bool, ttl: int) -> None:
        # CMD_TLBI_EL2_VA: EL2 entries of the ASID or global covering the range (EL2 without E2H
        # has no ASIDs: its entries are global and always match).
        self.generation += 1
        for kind in _STAGE1_KINDS:
            self._drop_range(kind, _EL2_VM, (asid, None), address, size, ttl)

    def invalidate_el2_vaa(self, address: int, size: int, leaf: bool, ttl: int) -> None:
        # CMD_TLBI_EL2_VAA: EL2 entries covering the range, any ASID.
        self.generation += 1
        for kind in _STAGE1_KINDS:
            self._drop_range(kind, _EL2_VM, None, address, size, ttl)

    def invalidate_s12_vmall(self, vmid: int) -> None:
        # CMD_TLBI_S12_VMALL: every EL1 entry of the VMID, stage 1, stage 2 and combined.
        self.generation += 1
        for kind in _ALL_KINDS:
            self._drop_space(kind, vmid)

    def invalidate_s2_ipa(self, vmid: int, address: int, size: int, leaf: bool, ttl: int) -> None:
        # CMD_TLBI_S2_IPA: EL1 stage-2 entries of the VMID covering the IPA range. Combined (NESTED)
        # entries need not be removed (§4.4.2): software must follow with NH_ALL or S12_VMALL.
        self.generation += 1
        self._drop_range(_S2, vmid, (None,), address, size, ttl)

    def invalidate_nsnh_all(self) -> None:
        # CMD_TLBI_NSNH_ALL: every EL1 entry of every VMID, all kinds; EL2 entries stay.
        self.generation += 1
        for kind in _ALL_KINDS:
            for vm in [vm for vm in self._spaces(kind) if vm != _EL2_VM]:
                self._drop_space(kind, vm)

    # -- removal helpers ---------------------------------------------------------------------------
    def _spaces(self, kind: TranslationKind) -> dict[int, _Space]:
        return self._s1 if kind is _S1 else self._s2 if kind is _S2 else self._nested

    def _drop_space(self, kind: TranslationKind, vm: int) -> None:
        space = self._spaces(kind).pop(vm, None)
        if space is None:
            return
        order = self._order
        for by_size in space.values():
            for table in by_size.values():
                for entry in table.values():
                    entry.alive = False
                    del order[entry.seq]
        if self._fragments:
            self._fragments = {
                key: span for key, span in self._fragments.items() if key[0] is not kind or key[1] != vm
            }

    def _drop_asid(self, kind: TranslationKind, vm: int, asid: int) -> None:
        spaces = self._spaces(kind)
        space = spaces.get(vm)
        if space is None:
            return
        by_size = space.pop(asid, None)
        if by_size is None:
            return
        for entry_size, table in by_size.items():
            self._fragments.pop((kind, vm, asid, entry_size), None)
            for entry in table.values():
                entry.alive = False
                del self._order[entry.seq]
        if not space:
            del spaces[vm]

    def _drop_range(
        self,
        kind: TranslationKind,
        vm: int,
        tags: tuple[int | None, ...] | None,
        address: int,
        size: int,
        ttl: int,
    ) -> None:
        """Remove entries of ``tags`` (None: every tag) whose leaf overlaps [address, address+size)
        and, when ``ttl`` is 1-3, whose leaf level is ``ttl``."""
        space = self._spaces(kind).get(vm)
        if space is None:
            return
        start = address
        end = address + (size or 1)
        for tag in list(space) if tags is None else tags:
            by_size = space.get(tag)
            if by_size is None:
                continue
            for entry_size, table in list(by_size.items()):
                span = max(entry_size, self._fragments.get((kind, vm, tag, entry_size), 0))
                low = start & -span
                high = (end + span - 1) & -span
                if (high - low) // entry_size <= len(table):
                    candidates = [
                        e for base in range(low, high, entry_size) if (e := table.get(base)) is not None
                    ]
                else:
                    candidates = list(table.values())
                for entry in candidates:
                    if ttl and entry.level != ttl:
                        continue
                    leaf = entry.leaf_size if entry.leaf_size > entry_size else entry_size
                    leaf_base = entry.input_base & -leaf
                    if leaf_base < end and leaf_base + leaf > start:
                        self._remove(entry)

    def _remove(self, entry: TlbEntry, ordered: bool = True) -> None:
        """Unlink one entry from the index (and from the age order unless the caller popped it)."""
        kind = entry.kind
        vm = entry.vmid if entry.world == WORLD_EL1 else _EL2_VM
        tag = None if kind is _S2 else entry.asid
        spaces = self._spaces(kind)
        space = spaces[vm]
        by_size = space[tag]
        table = by_size[entry.size]
        del table[entry.input_base]
        entry.alive = False
        if ordered:
            del self._order[entry.seq]
        if not table:
            del by_size[entry.size]
            self._fragments.pop((kind, vm, tag, entry.size), None)
            if not by_size:
                del space[tag]
                if not space:
                    del spaces[vm]
