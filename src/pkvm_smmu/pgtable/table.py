"""``IoPageTable``: builds and edits one AArch64 stage-1 or stage-2 table tree in simulated memory.

Semantics follow Linux's io-pgtable-arm together with the IOMMU core's page-size selection
(``iommu_map``/``iommu_unmap``): ``map`` picks the largest permitted page size that the alignment
of iova and paddr and the remaining length allow; mapping over a leaf, or over a table that
still maps something, is ``-EEXIST``; unmapping part of a block unmaps nothing (unless the config
asks for the old split behaviour); unmap stops at the first hole. Bad arguments are returned as
negative errnos, never raised, because a caller may be the hypervisor handling host values.

Removing a table page needs the walk caches invalidated before the page is reused. With
``flush_ops`` (Linux's ``tlb_flush_walk``) that happens synchronously and the page is freed at
once, and ``map`` may replace a table that maps nothing by a block, as Linux does. Without
``flush_ops``, unmap leaves freed pages in the gather for the caller, and ``map`` over any table
is ``-EEXIST``.

Runs of entries in one table are written with a single ``write_table`` built from an
``array('Q')``: that is the path the hypervisor's gigabyte-sized identity maps take.
"""

from __future__ import annotations

import errno
import sys
from array import array
from collections.abc import Iterator
from functools import lru_cache
from typing import NamedTuple

from pkvm_smmu.arch.vmsa import (
    DESC_BLOCK,
    DESC_PAGE,
    DESC_TABLE,
    desc_output_address,
    desc_table_address,
    make_desc_output_address,
)
from pkvm_smmu.pgtable.allocator import PageAllocator
from pkvm_smmu.pgtable.config import PageTableConfig
from pkvm_smmu.pgtable.gather import IotlbGather, TlbFlushOps
from pkvm_smmu.pgtable.memory import TableMemory
from pkvm_smmu.pgtable.prot import Prot, leaf_attributes

_SWAP = sys.byteorder != "little"  # descriptors are little-endian in memory
_ADDR_BITS_47_0 = (1 << 48) - 1
# Leaf attributes a split keeps: [11:2] and [63:51] except Contiguous (52).
_LEAF_ATTRS = 0xFFC | (((1 << 64) - 1) & ~((1 << 51) - 1) & ~(1 << 52))
# byte -> its bit 0, to find the first invalid entry from the descriptors' low bytes
_BIT0 = bytes(b & 1 for b in range(256))
_RW = Prot.READ | Prot.WRITE


class MapResult(NamedTuple):
    """Bytes mapped from the start of the request, and 0 or a negative errno.

    On error the first ``mapped`` bytes stay mapped (as with map_pages); the caller unrolls.
    """

    mapped: int
    error: int


class Leaf(NamedTuple):
    """A valid block or page descriptor: the input range it maps, its level, value and location."""

    iova: int
    size: int
    level: int
    desc: int
    pte_pa: int


class LeafRun(NamedTuple):
    """``entries`` same-level leaves mapping ``[iova, iova + entries * pgsize)``, descriptor ``k``
    being ``desc + k * pgsize``: contiguous output, identical attributes."""

    iova: int
    pgsize: int
    entries: int
    level: int
    desc: int

    @property
    def size(self) -> int:
        return self.pgsize * self.entries


@lru_cache(maxsize=32)
def _lanes(n: int) -> tuple[int, int]:
    """As integers of ``n`` little-endian 64-bit lanes: every lane 1, and lane k = k."""
    ones = ((1 << (64 * n)) - 1) // ((1 << 64) - 1)
    ramp = int.from_bytes(b"".join(k.to_bytes(8, "little") for k in range(n)), "little")
    return ones, ramp


def _descs(first: int, step: int, n: int) -> bytes:
    """``n`` little-endian descriptors ``first + k * step``, built in one big-integer expression
    (no lane can carry into the next: each value fits in 64 bits)."""
    ones, ramp = _lanes(n)
    return (first * ones + step * ramp).to_bytes(8 * n, "little")


def _load(raw: bytes) -> array[int]:
    out = array("Q")
    out.frombytes(raw)
    if _SWAP:
        out.byteswap()
    return out


def _any_valid(raw: bytes) -> bool:
    n = len(raw) >> 3
    return bool(int.from_bytes(raw[0::8], "little") & ((1 << (8 * n)) // 255))


class IoPageTable:
    """One table tree. ``root`` is the pgd's physical address (TTB0 / S2TTB).

    ``pages_allocated`` (table pages held) and ``pte_writes`` (descriptors written) are the cost
    model's counters.
    """

    def __init__(
        self,
        config: PageTableConfig,
        memory: TableMemory,
        allocator: PageAllocator,
        flush_ops: TlbFlushOps | None = None,
    ) -> None:
        g = config.granule
        if allocator.granule_size != g.size:
            raise ValueError(f"allocator pages are {allocator.granule_size:#x} bytes, granule is {g.size:#x}")
        self.config = config
        self.memory = memory
        self.allocator = allocator
        self.flush_ops = flush_ops
        self.granule = g
        self.pages_allocated = 0
        self.pte_writes = 0
        self._start = config.start_level
        self._shift = [g.level_shift(level) for level in range(4)]
        self._entries = [g.table_entries] * 4
        self._entries[self._start] = config.pgd_entries
        self._level_of = {g.block_size(level): level for level in range(4)}
        self._oa52 = config.oas > 48
        self._table_mask = _ADDR_BITS_47_0 & ~(g.size - 1)
        self._leaf_levels = frozenset(g.leaf_levels(config.oas))
        root = allocator.alloc_pages(config.pgd_pages)
        if root is None:
            raise MemoryError("no memory for the page table's pgd")
        self._check_table_pa(root)
        self.root = root
        self.pages_allocated = config.pgd_pages

    # -- small helpers --------------------------------------------------------------------------
    @property
    def table_bytes(self) -> int:
        return self.pages_allocated * self.granule.size

    def _table_addr(self, pte: int) -> int:
        if self._oa52:
            return desc_table_address(pte, self.granule, True)
        return pte & self._table_mask

    def _table_desc(self, pa: int) -> int:
        return make_desc_output_address(pa, self.granule, 3, self._oa52) | DESC_TABLE

    def _index_pa(self, table: int, iova: int, level: int) -> int:
        return table + (((iova >> self._shift[level]) & (self._entries[level] - 1)) << 3)

    def _alloc_table(self) -> int | None:
        pa = self.allocator.alloc_page()
        if pa is not None:
            self._check_table_pa(pa)
            self.pages_allocated += 1
        return pa

    def _check_table_pa(self, pa: int) -> None:
        if pa >> (52 if self._oa52 else 48) or pa & (self.granule.size - 1):
            raise ValueError(f"table page {pa:#x} cannot be held in a descriptor")

    def _release_tables(self, pages: list[int], iova: int, size: int, gather: IotlbGather | None) -> None:
        """Table ``pages`` no longer reachable from the tree once covering ``[iova, iova + size)``."""
        if self.flush_ops is not None:
            self.flush_ops.tlb_flush_walk(iova, size, self.granule.size)
        elif gather is not None:
            gather.add_page(iova, size, self.granule.size, leaf=False)
            gather.freed_tables.extend(pages)
            return
        for pa in pages:
            self.allocator.free_page(pa)
        self.pages_allocated -= len(pages)

    def _write_run(self, pa: int, first: int, level: int, paddr: int, n: int) -> None:
        """Write ``n`` leaves (or a split's entries) mapping ``paddr`` onwards, starting at ``pa``."""
        step = 1 << self._shift[level]
        if n == 1:
            self.memory.write_u64(pa, first)
        elif not self._oa52 or paddr + n * step <= 1 << 48:
            self.memory.write_table(pa, _descs(first, step, n))
        else:  # OA[51:48] sits in bits [15:12]: the encoding is not linear across 2^48
            base = first & ~make_desc_output_address(paddr, self.granule, level, True)
            values = array(
                "Q",
                (
                    base | make_desc_output_address(paddr + i * step, self.granule, level, True)
                    for i in range(n)
                ),
            )
            if _SWAP:
                values.byteswap()
            self.memory.write_table(pa, memoryview(values))
        self.pte_writes += n

    def _pgsize(self, iova: int, paddr: int, size: int) -> tuple[int, int]:
        """The IOMMU core's choice: the largest page size the alignment and length allow, and how
        many of them to map before a larger size could take over."""
        bitmap = self.config.pgsize_bitmap
        sizes = bitmap & ((1 << size.bit_length()) - 1)
        merged = iova | paddr
        if merged:
            sizes &= ((merged & -merged) << 1) - 1
        pgsize = 1 << (sizes.bit_length() - 1)
        larger = bitmap & ~((pgsize << 1) - 1)
        if larger:
            next_size = larger & -larger
            if not (iova ^ paddr) & (next_size - 1):
                to_boundary = next_size - (merged & (next_size - 1))
                if to_boundary + next_size <= size:
                    size = to_boundary
        return pgsize, size // pgsize

    # -- map ------------------------------------------------------------------------------------
    def map(self, iova: int, paddr: int, size: int, prot: int) -> MapResult:
        """Map ``[iova, iova + size)`` to ``paddr`` with ``prot`` (``Prot`` flags)."""
        cfg = self.config
        if iova < 0 or paddr < 0 or size <= 0 or not prot & _RW:
            return MapResult(0, -errno.EINVAL)
        if (iova | paddr | size) & (cfg.min_pgsize - 1):
            return MapResult(0, -errno.EINVAL)
        if iova + size > 1 << cfg.ias or paddr + size > 1 << cfg.oas:
            return MapResult(0, -errno.ERANGE)
        attrs = leaf_attributes(cfg.stage, Prot(prot & 0x3F))
        mapped = 0
        while mapped < size:
            pgsize, count = self._pgsize(iova, paddr, size - mapped)
            n, error = self._map_run(iova, paddr, self._level_of[pgsize], count, attrs)
            mapped += n * pgsize
            if error:
                return MapResult(mapped, error)
            iova += n * pgsize
            paddr += n * pgsize
        return MapResult(mapped, 0)

    def _map_run(self, iova: int, paddr: int, level: int, count: int, attrs: int) -> tuple[int, int]:
        """Map up to ``count`` entries at ``level``, as many as fit in the one table reached."""
        mem = self.memory
        table = self.root
        fresh = False
        for lvl in range(self._start, level):
            pte_pa = self._index_pa(table, iova, lvl)
            pte = 0 if fresh else mem.read_u64(pte_pa)
            if not pte & 1:
                new = self._alloc_table()
                if new is None:
                    return 0, -errno.ENOMEM
                mem.write_u64(pte_pa, self._table_desc(new))
                self.pte_writes += 1
                table, fresh = new, True
            elif pte & 2:
                table, fresh = self._table_addr(pte), False
            else:  # a block already maps this range
                return 0, -errno.EEXIST
        index = (iova >> self._shift[level]) & (self._entries[level] - 1)
        n = min(count, self._entries[level] - index)
        pa = table + (index << 3)
        if not fresh:
            raw = mem.read_table(pa, n << 3)
            if _any_valid(raw) and not self._replace_empty_tables(raw, pa, iova, level):
                return 0, -errno.EEXIST  # a leaf, or a table still in use where this block would go
        first = attrs | (DESC_PAGE if level == 3 else DESC_BLOCK)
        first |= make_desc_output_address(paddr, self.granule, level, self._oa52)
        self._write_run(pa, first, level, paddr, n)
        return n, 0

    def _replace_empty_tables(self, raw: bytes, pa: int, iova: int, level: int) -> bool:
        """Remove the tables among ``raw``'s entries if none maps anything (needs ``flush_ops``)."""
        if self.flush_ops is None or level == 3:
            return False
        doomed: list[tuple[int, list[int]]] = []
        for i, pte in enumerate(_load(raw)):
            if not pte & 1:
                continue
            pages = self._leafless_subtree(self._table_addr(pte), level + 1) if pte & 2 else None
            if pages is None:
                return False
            doomed.append((i, pages))
        size = 1 << self._shift[level]
        for i, pages in doomed:
            self.memory.write_u64(pa + (i << 3), 0)
            self.pte_writes += 1
            self._release_tables(pages, iova + i * size, size, None)
        return True

    def _leafless_subtree(self, table: int, level: int) -> list[int] | None:
        """``table`` and the tables below it, or None if any of them holds a valid leaf."""
        out = [table]
        for pte in _load(self.memory.read_table(table, self.granule.size)):
            if not pte & 1:
                continue
            if level == 3 or not pte & 2:
                return None
            below = self._leafless_subtree(self._table_addr(pte), level + 1)
            if below is None:
                return None
            out.extend(below)
        return out

    # -- unmap ----------------------------------------------------------------------------------
    def unmap(self, iova: int, size: int, gather: IotlbGather | None = None) -> int:
        """Unmap ``[iova, iova + size)``; returns the bytes unmapped from ``iova`` onwards.

        Stops at the first hole, or at a block only partly inside the range (0 bytes for it unless
        ``split_blocks``). Without ``flush_ops``, table pages removed go to the gather and stay
        allocated until ``release_freed_tables``; with neither, they are freed at once and the
        caller must invalidate before the allocator hands them out again.
        """
        cfg = self.config
        if iova < 0 or size <= 0 or (iova | size) & (cfg.min_pgsize - 1) or iova + size > 1 << cfg.ias:
            return 0
        unmapped = 0
        while unmapped < size:
            pgsize, count = self._pgsize(iova, iova, size - unmapped)
            done = self._unmap_run(iova, self._level_of[pgsize], count, gather)
            if not done:
                break
            iova += done
            unmapped += done
        return unmapped

    def _unmap_run(self, iova: int, level: int, count: int, gather: IotlbGather | None) -> int:
        mem = self.memory
        table = self.root
        path: list[tuple[int, int, int]] = []  # (table, level, pte_pa) of each table walked through
        lvl = self._start
        while lvl < level:
            pte_pa = self._index_pa(table, iova, lvl)
            pte = mem.read_u64(pte_pa)
            if not pte & 1:
                return 0
            if not pte & 2:  # a block larger than the request
                if not self.config.split_blocks:
                    return 0
                new = self._split_block(pte_pa, pte, lvl, iova, gather)
                if new is None:
                    return 0
                pte = self._table_desc(new)
            path.append((table, lvl, pte_pa))
            table = self._table_addr(pte)
            lvl += 1
        index = (iova >> self._shift[level]) & (self._entries[level] - 1)
        n = min(count, self._entries[level] - index)
        pa = table + (index << 3)
        raw = mem.read_table(pa, n << 3)
        valid = raw[0::8].translate(_BIT0).find(0)
        n = n if valid < 0 else valid
        if not n:
            return 0
        size = 1 << self._shift[level]
        # tables under a block-sized unmap go, with everything below them
        tables = [(i, pte) for i, pte in enumerate(_load(raw[: n << 3])) if pte & 2] if level < 3 else []
        mem.write_table(pa, bytes(n << 3))
        self.pte_writes += n
        for i, pte in tables:
            self._release_tables(
                self._subtree(self._table_addr(pte), level + 1), iova + i * size, size, gather
            )
        if gather is not None:
            gather.add_page(iova, n * size, size)
        if self.config.free_empty_tables:
            self._free_empty(path, table, iova, gather)
        return n * size

    def _split_block(
        self, pte_pa: int, pte: int, level: int, iova: int, gather: IotlbGather | None
    ) -> int | None:
        """Replace a block by a next-level table mapping the same range the same way."""
        new = self._alloc_table()
        if new is None:
            return None
        g = self.granule
        child = level + 1
        oa = desc_output_address(pte, g, level, self._oa52)
        first = (pte & _LEAF_ATTRS) | (DESC_PAGE if child == 3 else DESC_BLOCK)
        first |= make_desc_output_address(oa, g, child, self._oa52)
        self._write_run(new, first, child, oa, g.table_entries)
        self.memory.write_u64(pte_pa, self._table_desc(new))
        self.pte_writes += 1
        if gather is not None:  # the TLB may hold the old block
            block = g.block_size(level)
            gather.add_page(iova & ~(block - 1), block, block)
        return new

    def _subtree(self, table: int, level: int) -> list[int]:
        """``table`` and every table below it."""
        out = [table]
        if level < 3:
            for pte in _load(self.memory.read_table(table, self.granule.size)):
                if pte & 3 == DESC_TABLE:
                    out.extend(self._subtree(self._table_addr(pte), level + 1))
        return out

    def _free_empty(
        self, path: list[tuple[int, int, int]], table: int, iova: int, gather: IotlbGather | None
    ) -> None:
        while path and not _any_valid(self.memory.read_table(table, self.granule.size)):
            parent, level, pte_pa = path.pop()
            self.memory.write_u64(pte_pa, 0)
            self.pte_writes += 1
            block = self.granule.block_size(level)
            self._release_tables([table], iova & ~(block - 1), block, gather)
            table = parent

    def release_freed_tables(self, gather: IotlbGather) -> int:
        """Return the table pages an unmap gathered to the allocator (after the invalidation)."""
        freed = len(gather.freed_tables)
        for pa in gather.freed_tables:
            self.allocator.free_page(pa)
        self.pages_allocated -= freed
        gather.freed_tables.clear()
        return freed

    # -- lookups --------------------------------------------------------------------------------
    def iova_to_phys(self, iova: int) -> int | None:
        """The output address ``iova`` translates to, or None (architectural walk of this tree)."""
        if iova < 0 or iova >> self.config.ias:
            return None
        table = self.root
        for level in range(self._start, 4):
            pte = self.memory.read_u64(self._index_pa(table, iova, level))
            if not pte & 1:
                return None
            if pte & 2 and level < 3:
                table = self._table_addr(pte)
                continue
            if (level == 3) != bool(pte & 2) or level not in self._leaf_levels:
                return None  # 01 at level 3, or a block where the granule has none
            oa = desc_output_address(pte, self.granule, level, self._oa52)
            return oa | (iova & ((1 << self._shift[level]) - 1))
        return None

    def walk_leaves(self, start: int = 0, end: int | None = None) -> Iterator[Leaf]:
        """Valid leaves whose range meets ``[start, end)``, in address order."""
        stop = 1 << self.config.ias if end is None else end
        yield from self._walk(self.root, self._start, 0, start, stop)

    def _walk(self, table: int, level: int, base: int, start: int, stop: int) -> Iterator[Leaf]:
        shift = self._shift[level]
        size = 1 << shift
        first = max(0, (start - base) >> shift)
        last = min(self._entries[level], -(-(stop - base) // size))
        if first >= last:
            return
        raw = self.memory.read_table(table + (first << 3), (last - first) << 3)
        for i, pte in enumerate(_load(raw), first):
            if not pte & 1:
                continue
            va = base + (i << shift)
            if level < 3 and pte & 2:
                yield from self._walk(self._table_addr(pte), level + 1, va, start, stop)
            elif (level == 3) == bool(pte & 2) and level in self._leaf_levels:
                yield Leaf(va, size, level, pte, table + (i << 3))

    def walk_runs(self, start: int = 0, end: int | None = None) -> Iterator[LeafRun]:
        """``walk_leaves`` grouped into maximal runs (see ``LeafRun``); a leaf table built in bulk
        is checked as a whole, so a gigabyte identity map is a handful of runs, quickly."""
        run: LeafRun | None = None
        stop = 1 << self.config.ias if end is None else end
        for piece in self._runs(self.root, self._start, 0, start, stop):
            if (
                run is not None
                and piece.level == run.level
                and piece.iova == run.iova + run.size
                and piece.desc == run.desc + run.size
            ):
                run = run._replace(entries=run.entries + piece.entries)
                continue
            if run is not None:
                yield run
            run = piece
        if run is not None:
            yield run

    def _runs(self, table: int, level: int, base: int, start: int, stop: int) -> Iterator[LeafRun]:
        shift = self._shift[level]
        size = 1 << shift
        first = max(0, (start - base) >> shift)
        last = min(self._entries[level], -(-(stop - base) // size))
        if first >= last:
            return
        raw = self.memory.read_table(table + (first << 3), (last - first) << 3)
        head = int.from_bytes(raw[:8], "little")
        leaf_bits = DESC_PAGE if level == 3 else DESC_BLOCK
        n = last - first
        if level in self._leaf_levels and head & 3 == leaf_bits and raw == _descs(head, size, n):
            yield LeafRun(base + (first << shift), size, n, level, head)
            return
        for i, pte in enumerate(_load(raw), first):
            if not pte & 1:
                continue
            va = base + (i << shift)
            if level < 3 and pte & 2:
                yield from self._runs(self._table_addr(pte), level + 1, va, start, stop)
            elif (level == 3) == bool(pte & 2) and level in self._leaf_levels:
                yield LeafRun(va, size, 1, level, pte)

    def table_pages(self) -> list[int]:
        """Physical addresses of every table page of the tree, the pgd's pages first."""
        pages = [self.root + i * self.granule.size for i in range(self.config.pgd_pages)]
        if self._start < 3:
            raw = self.memory.read_table(self.root, self.config.pgd_size)
            for pte in _load(raw):
                if pte & 3 == DESC_TABLE:
                    pages.extend(self._subtree(self._table_addr(pte), self._start + 1))
        return pages

    def free_all(self) -> None:
        """Free every table page (the tree must no longer be in use by any SMMU)."""
        pages = self.table_pages()
        for pa in pages[self.config.pgd_pages :]:
            self.allocator.free_page(pa)
        self.allocator.free_pages(self.root, self.config.pgd_pages)
        self.pages_allocated = 0
