"""Check 2: live STE and CD updates must be hitless.

The SMMU may fetch any reachable STE or CD at any time, valid or not, and keep what it fetched
until a CFGI covering it is consumed (IHI 0070 §3.21). So every memory state a structure passes
through between two such sync points may be what the SMMU uses. Two rules follow:

- within a window (between two sync points), every state after a store must be, on the bits the
  SMMU uses, the state synced before the window or the one synced at its end, and legal;
- a synced state the structure leaves again (stores follow, then another sync) before any
  translation used it is taken as an intermediate step of one update (as Linux's
  ``arm_smmu_write_entry`` makes them): it too must behave as the synced state before it or the
  one after it, or be invalid (V=0), or be where a break-before-make starts (the next is V=0), and
  be legal. Two used words changed with a sync in between (S1 -> S2 without going through V=0)
  breaks this one. The sanitizer cannot see intent: software that makes two complete updates in a
  row, with no transaction in between, is judged as if it made one; except the hyp, whose updates
  are bounded by the traps they are made in (stores of two traps are two updates).

A CD table a nested STE reaches is fetched through stage 2: a store to it while stage 2 does not
map it (the page was taken from the host) cannot be observed, so it is not a step of an update.

Reachability follows the hardware: while SMMUEN is set, the stream table the STRTAB registers
describe (every L2 table a valid L1 descriptor points to), and the CD tables the STEs in it point
to (through stage 2 for nested STEs), including every L2 CD table a valid L1CD points to. The
sanitizer keeps a shadow copy of that memory so it knows each word's value before a store.

Each 64-bit store is one step. A larger store (a memcpy of a whole entry) is not single-copy atomic
as a whole: every combination of the words it changes is a possible intermediate state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pkvm_smmu.arch.registers import STRTAB_BASE, STRTAB_BASE_CFG, StrtabFmt
from pkvm_smmu.arch.strtab import CD, CD_SIZE, L1CD, L1STD, STE, STE_SIZE, SteConfig
from pkvm_smmu.machine.bus import Access
from pkvm_smmu.machine.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, Ram
from pkvm_smmu.machine.smmu.decode import WORLD_EL1, decode_cd, decode_ste
from pkvm_smmu.machine.smmu.types import WalkConfig, WalkLeaf
from pkvm_smmu.machine.smmu.walk import walk
from pkvm_smmu.smmu_lib.entry import cd_used, ste_update_safe, ste_used
from pkvm_smmu.verify.sanitizer._commands import ConfigScope
from pkvm_smmu.verify.sanitizer._context import RunContext, read_entry
from pkvm_smmu.verify.sanitizer._report import Check, Location, SanitizerReport

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

L1STD_TABLE = "L1STD"
STE_TABLE = "STE"
L1CD_TABLE = "L1CD"
CD_TABLE = "CD"
_ENTRY_SIZE = {L1STD_TABLE: 8, STE_TABLE: STE_SIZE, L1CD_TABLE: 8, CD_TABLE: CD_SIZE}
_SPLIT_VALUES = (6, 8, 10)
_S1_CONFIGS = (SteConfig.S1_TRANS, SteConfig.NESTED)
_WORD_MASK = (1 << 64) - 1


class _Shadow:
    """A copy of table memory, page by page. Pages RAM never backed read as zero and are not
    copied, so a huge table (a linear CD table of 2^20 entries) costs only what it holds."""

    def __init__(self, ram: Ram, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self._pages: dict[int, bytearray] = {}
        for pfn in range(base >> PAGE_SHIFT, ((base + size - 1) >> PAGE_SHIFT) + 1):
            page = ram.page_if_backed(pfn)
            if page is not None:
                self._pages[pfn] = bytearray(page)

    def read(self, address: int, length: int) -> bytes:
        """``length`` bytes within one page."""
        page = self._pages.get(address >> PAGE_SHIFT)
        offset = address & PAGE_MASK
        return bytes(length) if page is None else bytes(page[offset : offset + length])

    def write(self, address: int, data: bytes) -> None:
        """``data`` within one page."""
        pfn = address >> PAGE_SHIFT
        page = self._pages.get(pfn)
        if page is None:
            page = self._pages[pfn] = bytearray(PAGE_SIZE)
        offset = address & PAGE_MASK
        page[offset : offset + len(data)] = data

    def nonzero_words(self, stride: int) -> list[tuple[int, int]]:
        """(address, value) of every non-zero 64-bit word at ``stride``-aligned offsets."""
        found = []
        end = self.base + self.size
        for pfn, page in sorted(self._pages.items()):
            first = max(self.base, pfn << PAGE_SHIFT)
            last = min(end, (pfn + 1) << PAGE_SHIFT)
            first += -(first - self.base) % stride
            words = memoryview(page).cast("Q")
            for address in range(first, last, stride):
                value = words[(address & PAGE_MASK) >> 3]
                if value:
                    found.append((address, value))
        return found


@dataclass(eq=False)
class _Region:
    """Table memory the SMMU can reach, with a shadow copy of its contents."""

    kind: str
    base: int
    shadow: _Shadow
    first: int  # STE: SID of the first entry; CD: CD index of the first entry; L1: first L1 index
    world: str = WORLD_EL1  # CD tables: the StreamWorld their CDs are decoded in
    leaf_bits: int = 0  # L1STD: SPLIT; L1CD: CD index bits per L2 table
    s2: WalkConfig | None = None  # tables of nested STEs: fetched, and L2 pointers taken, as IPAs
    ipa: int | None = None  # with s2: the IPA the SMMU fetches ``base`` at
    sids: set[int] = field(default_factory=set)  # CD and L1CD tables: the SIDs reaching them
    parent: _Region | None = None
    children: dict[int, list[_Region]] = field(default_factory=dict)  # L1 index -> L2 tables

    @property
    def size(self) -> int:
        return self.shadow.size

    @property
    def end(self) -> int:
        return self.base + self.shadow.size

    def reaching_sids(self) -> set[int]:
        return self.parent.reaching_sids() if self.parent is not None else self.sids


@dataclass(eq=False)
class _Structure:
    """One STE or CD the software has stored to: its synced states and the open window."""

    region: _Region
    address: int
    index: int  # SID of an STE, CD index of a CD
    synced: int  # the state at the last sync point
    synced_at: Location | None
    previous: int | None = None  # the state synced before that, if known
    previous_at: Location | None = None
    made_by: Location | None = None  # the last store before the last sync point
    used: bool = True  # a translation used the synced state (unknown for the first: assume so)
    reported: bool = False  # the window that made the synced state was reported (one per update)
    states: list[tuple[int, Location]] = field(default_factory=list)  # stores since the sync

    @property
    def is_ste(self) -> bool:
        return self.region.kind == STE_TABLE


class HitlessCheck:
    """Check 2 on one SMMU."""

    def __init__(self, run: RunContext, smmu: SmmuV3) -> None:
        self.run = run
        self.smmu = smmu
        self.features = smmu.features
        self._pages: dict[int, list[_Region]] = {}
        self._root: _Region | None = None
        self._cd_roots: dict[int, list[_Region]] = {}  # SID -> the CD (or L1CD) tables it reaches
        self._cd_tables: dict[tuple[str, int, int], _Region] = {}
        self._structures: dict[int, _Structure] = {}  # by address

    # -- reachability ------------------------------------------------------------------------------
    def smmu_enabled(self, enabled: bool) -> None:
        """SMMUEN took effect (CR0ACK): the stream table becomes reachable, or nothing is."""
        self._clear()
        if enabled:
            self._build_stream_table()

    def _clear(self) -> None:
        self._pages.clear()
        self._root = None
        self._cd_roots.clear()
        self._cd_tables.clear()
        self._structures.clear()

    def _add(self, region: _Region) -> _Region:
        for pfn in range(region.base >> PAGE_SHIFT, ((region.end - 1) >> PAGE_SHIFT) + 1):
            self._pages.setdefault(pfn, []).append(region)
        return region

    def _remove(self, region: _Region) -> None:
        for children in region.children.values():
            for child in children:
                self._remove(child)
        region.children.clear()
        for pfn in range(region.base >> PAGE_SHIFT, ((region.end - 1) >> PAGE_SHIFT) + 1):
            regions = self._pages.get(pfn)
            if regions is not None:
                regions[:] = [r for r in regions if r is not region]
                if not regions:
                    del self._pages[pfn]
        for address in [a for a, st in self._structures.items() if st.region is region]:
            del self._structures[address]  # unreachable now: its stores no longer matter

    def _region(
        self,
        kind: str,
        base: int,
        size: int,
        first: int,
        *,
        world: str = WORLD_EL1,
        leaf_bits: int = 0,
        s2: WalkConfig | None = None,
        ipa: int | None = None,
        parent: _Region | None = None,
    ) -> _Region:
        shadow = _Shadow(self.run.ram, base, size)
        return self._add(_Region(kind, base, shadow, first, world, leaf_bits, s2, ipa, parent=parent))

    def _build_stream_table(self) -> None:
        smmu = self.smmu
        cfg = smmu.strtab_base_cfg
        base = STRTAB_BASE.ADDR.get_address(smmu.strtab_base)
        log2size = min(STRTAB_BASE_CFG.LOG2SIZE.get(cfg), self.features.sid_bits)
        two_level = STRTAB_BASE_CFG.FMT.get(cfg) == StrtabFmt.TWO_LEVEL and self.features.two_level_strtab
        if not two_level:
            size = STE_SIZE << log2size
            self._root = self._region(STE_TABLE, base & ~(size - 1), size, 0)
            self._scan_stes(self._root)
            return
        split = STRTAB_BASE_CFG.SPLIT.get(cfg)
        split = min(split if split in _SPLIT_VALUES else 6, log2size)
        entries = max(1, 1 << (log2size - split))
        root = self._region(L1STD_TABLE, base & ~(entries * 8 - 1), entries * 8, 0, leaf_bits=split)
        self._root = root
        self._scan_l1(root)

    def _scan_l1(self, region: _Region) -> None:
        for address, _ in region.shadow.nonzero_words(8):
            self._l1_changed(region, (address - region.base) // 8)

    def _l1_changed(self, region: _Region, index: int) -> None:
        """An L1 descriptor changed: its old L2 table is unreachable, its new one reachable."""
        for child in region.children.pop(index, []):
            self._remove(child)
        desc = int.from_bytes(region.shadow.read(region.base + 8 * index, 8), "little")
        if region.kind == L1STD_TABLE:
            span = L1STD.SPAN.get(desc)
            if not 0 < span <= region.leaf_bits + 1:
                return
            entries = 1 << (span - 1)
            l2 = L1STD.L2PTR.get_address(desc) & ~(entries * STE_SIZE - 1)
            first = (region.first + index) << region.leaf_bits
            child = self._region(STE_TABLE, l2, entries * STE_SIZE, first, parent=region)
            region.children[index] = [child]
            self._scan_stes(child)
            return
        if not L1CD.V.get(desc):
            return
        first = (region.first + index) << region.leaf_bits
        size = CD_SIZE << region.leaf_bits
        l2 = L1CD.L2PTR.get_address(desc)
        region.children[index] = [
            self._region(
                CD_TABLE,
                pa,
                chunk,
                first + offset // CD_SIZE,
                world=region.world,
                s2=region.s2,
                ipa=l2 + offset if region.s2 is not None else None,
                parent=region,
            )
            for pa, chunk, offset in self._chunks(l2, size, region.s2)
        ]

    def _scan_stes(self, region: _Region) -> None:
        for address, word0 in region.shadow.nonzero_words(STE_SIZE):
            if word0 & 1 and STE.CONFIG.get(word0) in _S1_CONFIGS:
                sid = region.first + (address - region.base) // STE_SIZE
                self._refresh_cds(sid, [int.from_bytes(region.shadow.read(address, STE_SIZE), "little")])

    def _refresh_cds(self, sid: int, stes: list[int]) -> None:
        """The CD tables ``sid`` reaches through any of these values of its STE (tables it still
        reaches keep their shadow and the state of their CDs)."""
        roots: list[_Region] = []
        for ste in dict.fromkeys(stes):
            for region in self._cd_tables_of(sid, ste):
                region.sids.add(sid)
                if region not in roots:
                    roots.append(region)
        for region in self._cd_roots.pop(sid, []):
            if region in roots:
                continue
            region.sids.discard(sid)
            if not region.sids:
                self._cd_tables.pop((region.kind, region.base, region.size), None)
                self._remove(region)
        if roots:
            self._cd_roots[sid] = roots

    def _cd_tables_of(self, sid: int, ste: int) -> list[_Region]:
        if not STE.V.get(ste) or STE.CONFIG.get(ste) not in _S1_CONFIGS:
            return []
        stream = decode_ste(sid, ste, 0, (), self.features)
        if stream.illegal is not None or not stream.s1:
            return []
        s2 = stream.s2_walk if stream.s2 else None
        cdmax, ptr = stream.s1_cdmax, stream.s1_context_ptr
        if cdmax and stream.s1_fmt:
            leaf_bits = 6 if stream.s1_fmt == 1 else 10
            entries = max(1, 1 << max(0, cdmax - leaf_bits))
            kind, size, entry_size = L1CD_TABLE, entries * 8, 8
        else:
            leaf_bits = 0
            kind, size, entry_size = CD_TABLE, CD_SIZE << cdmax, CD_SIZE
        tables = []
        base = ptr & ~(size - 1)
        for pa, chunk, offset in self._chunks(base, size, s2):
            key = (kind, pa, chunk)
            region = self._cd_tables.get(key)
            if region is None:
                ipa = base + offset if s2 is not None else None
                region = self._region(
                    kind,
                    pa,
                    chunk,
                    offset // entry_size,
                    world=stream.world,
                    leaf_bits=leaf_bits,
                    s2=s2,
                    ipa=ipa,
                )
                self._cd_tables[key] = region
                if kind == L1CD_TABLE:
                    self._scan_l1(region)
            tables.append(region)
        return tables

    def _chunks(self, address: int, size: int, s2: WalkConfig | None) -> list[tuple[int, int, int]]:
        """(PA, size, offset) pieces of a table at ``address``: an IPA when ``s2`` translates it."""
        if s2 is None:
            return [(address, size, 0)]
        ram = self.run.ram
        pieces = []
        offset = 0
        while offset < size:
            ipa = address + offset
            chunk = min(size - offset, PAGE_SIZE - (ipa % PAGE_SIZE))
            leaf = walk(s2, ipa, lambda pa: ram.read_int(pa, 8))
            if isinstance(leaf, WalkLeaf):
                pieces.append((leaf.output_base + (ipa - leaf.input_base), chunk, offset))
            offset += chunk
        return pieces

    # -- stores ------------------------------------------------------------------------------------
    def write(self, access: Access, where: Location) -> None:
        start = access.address
        end = start + access.size
        regions: list[_Region] = []
        for pfn in range(start >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1):
            for region in self._pages.get(pfn, ()):
                if region not in regions and region.base < end and start < region.end:
                    regions.append(region)
        seen: set[int] = set()
        for region in regions:
            if region in self._pages.get(region.base >> PAGE_SHIFT, ()):  # not dropped meanwhile
                self._store(region, max(start, region.base), min(end, region.end), where, seen)

    def _store(self, region: _Region, start: int, end: int, where: Location, seen: set[int]) -> None:
        ram = self.run.ram
        entry_size = _ENTRY_SIZE[region.kind]
        first_slot = (start - region.base) // entry_size
        last_slot = (end - 1 - region.base) // entry_size
        for slot in range(first_slot, last_slot + 1):
            address = region.base + slot * entry_size
            old = region.shadow.read(address, entry_size)
            new = ram.read(address, entry_size)
            if old == new:
                continue
            region.shadow.write(address, new)
            if not self._fetchable(region, address):
                continue
            if region.kind in (L1STD_TABLE, L1CD_TABLE):
                self._l1_changed(region, slot)
                continue
            if address in seen:
                continue
            seen.add(address)
            self._step(region, address, region.first + slot, old, new, where)

    def _fetchable(self, region: _Region, address: int) -> bool:
        """Can the SMMU fetch ``address`` now? Tables reached through stage 2 only while it maps them."""
        if region.s2 is None or region.ipa is None:
            return True
        ipa = region.ipa + (address - region.base)
        leaf = walk(region.s2, ipa, lambda pa: self.run.ram.read_int(pa, 8))
        return isinstance(leaf, WalkLeaf) and leaf.output_base + (ipa - leaf.input_base) == address

    def _step(
        self, region: _Region, address: int, index: int, old: bytes, new: bytes, where: Location
    ) -> None:
        before = int.from_bytes(old, "little")
        after = int.from_bytes(new, "little")
        structure = self._structures.get(address)
        if structure is None:
            structure = _Structure(region, address, index, before, None)
            self._structures[address] = structure
        changed = [i for i in range(8) if ((before ^ after) >> (64 * i)) & _WORD_MASK]
        for subset in range(1, 1 << len(changed)):
            state = before
            for bit, word in enumerate(changed):
                if subset >> bit & 1:
                    mask = _WORD_MASK << (64 * word)
                    state = (state & ~mask) | (after & mask)
            structure.states.append((state, where))
        if region.kind == STE_TABLE:
            self._refresh_cds(index, [structure.synced, after])

    # -- translations ------------------------------------------------------------------------------
    def used(self, address: int, value: int) -> None:
        """A translation used the STE or CD at ``address`` as it was: that state was not transient."""
        structure = self._structures.get(address)
        if structure is not None and structure.synced == value:
            structure.used = True

    # -- sync points -------------------------------------------------------------------------------
    def sync_point(self, scope: ConfigScope, where: Location) -> None:
        """A CFGI was consumed: the structures it covers settle into their next synced state."""
        for structure in list(self._structures.values()):
            if not structure.states:
                continue
            if structure.is_ste:
                covered = scope.covers_ste(structure.index)
            else:
                reaching = structure.region.reaching_sids()
                covered = any(scope.covers_cd(sid, structure.index) for sid in reaching)
            if covered:
                self._settle(structure, where)

    def finish(self, where: Location) -> None:
        """Settle every update still open, as if the SMMU synced now."""
        for structure in list(self._structures.values()):
            if structure.states:
                self._settle(structure, where)

    def _used_bits(self, structure: _Structure, state: int) -> int:
        return ste_used(state) if structure.is_ste else cd_used(state)

    def _behaves_as(self, structure: _Structure, state: int, other: int, safe: int) -> bool:
        return not (state ^ other) & self._used_bits(structure, other) & ~safe

    def _settle(self, structure: _Structure, where: Location) -> None:
        self.run.coverage.updates += 1
        synced = structure.synced
        current = read_entry(self.run.ram, structure.address)
        safe = 0
        if structure.is_ste:
            safe = ste_update_safe(synced, current) & ste_used(synced) & ste_used(current)
            self._refresh_cds(structure.index, [current])
        # One report per window: the first state that is neither, or an ILLEGAL one if any is.
        bad = [
            (state, store)
            for state, store in structure.states
            if not self._behaves_as(structure, state, synced, safe)
            and not self._behaves_as(structure, state, current, safe)
        ]
        if bad:
            state, store = next(((st, at) for st, at in bad if self._illegal(structure, st)), bad[0])
            self._report(structure, state, synced, current, store, where, transient=False)
        reported = bool(bad)
        previous = structure.previous
        made_by = structure.made_by
        # The hyp's updates end with the trap they were made in.
        one_update = made_by is not None and all(store.trap == made_by.trap for _, store in structure.states)
        if (
            one_update
            and not reported
            and not structure.reported
            and previous is not None
            and not structure.used
        ):
            # The synced state was left before anything used it: one step of a longer update.
            safe_before = ste_update_safe(previous, current) if structure.is_ste else 0
            valid = STE.V.get(synced) if structure.is_ste else CD.V.get(synced)
            # A next state with V=0 starts a break-before-make: the synced state was its start.
            breaks = not (STE.V.get(current) if structure.is_ste else CD.V.get(current))
            if (
                valid
                and not breaks
                and not (
                    self._behaves_as(structure, synced, previous, safe_before)
                    or self._behaves_as(structure, synced, current, safe_before)
                )
            ):
                assert made_by is not None
                self._report(structure, synced, previous, current, made_by, where, transient=True)
                reported = True
        # What made the new synced state: the first store that left the old one's behaviour.
        departed = (
            store for state, store in structure.states if not self._behaves_as(structure, state, synced, safe)
        )
        structure.made_by = next(departed, structure.states[-1][1])
        structure.previous, structure.previous_at = synced, structure.synced_at
        structure.synced, structure.synced_at = current, where
        structure.states = []
        structure.used = False
        structure.reported = reported

    def _illegal(self, structure: _Structure, state: int) -> str | None:
        """Why ``state`` is ILLEGAL (an invalid STE or CD is not: it is a legal way to say abort)."""
        index, address = structure.index, structure.address
        if structure.is_ste:
            illegal = decode_ste(index, state, address, (), self.features).illegal
        else:
            world = structure.region.world
            illegal = decode_cd(index, index, state, address, (), self.features, world).illegal
        return None if illegal == "V=0" else illegal

    def _report(
        self,
        structure: _Structure,
        state: int,
        before: int,
        after: int,
        store: Location,
        where: Location,
        *,
        transient: bool,
    ) -> None:
        index, address = structure.index, structure.address
        if structure.is_ste:
            name = f"STE sid={index:#x} @{address:#x}"
        else:
            sids = ",".join(f"{sid:#x}" for sid in sorted(structure.region.reaching_sids()))
            name = f"CD sid={sids} ssid={index:#x} @{address:#x}"
        if transient:
            before_at = structure.previous_at
            what = f"the state synced at {_seq(structure.synced_at)}, left before any translation used it"
        else:
            before_at = structure.synced_at
            what = "the state after this store"
        span = f"between the states synced at {_seq(before_at)} and at {_seq(where)}"
        illegal = self._illegal(structure, state)
        if illegal is not None:
            check = Check.ILLEGAL_INTERMEDIATE
            message = f"{what}, {span}, is ILLEGAL ({illegal})"
        else:
            check = Check.NOT_HITLESS
            differs_before = _words_differing(state, before, self._used_bits(structure, before))
            differs_after = _words_differing(state, after, self._used_bits(structure, after))
            message = (
                f"{what}, {span}, is neither of them on the bits the SMMU uses "
                f"(used words {differs_before} differ from the first, {differs_after} from the second)"
            )
        self.run.add(
            SanitizerReport(
                check,
                self.smmu.name,
                name,
                message,
                store,
                where,
                "one used word changed per sync, or an update through V=0",
            )
        )


def _seq(where: Location | None) -> str:
    return f"seq {where.seq}" if where is not None else "the start"


def _words_differing(a: int, b: int, mask: int) -> list[int]:
    diff = (a ^ b) & mask
    return [i for i in range(8) if (diff >> (64 * i)) & _WORD_MASK]


__all__ = ["HitlessCheck"]
