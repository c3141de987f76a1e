"""The identity stage-2 shared by every SMMU (v4 patches 10, 26 and 27).

One stage-2 ``IoPageTable`` maps each page the host may access at its own address (IPA == PA),
so an STE the hyp turns into "stage-2 only" or "nested" can reach exactly the host's memory.
Its configuration is the intersection of what every SMMU supports; it is built from the host's
ownership at init and kept in step with every later ownership change, the TLBs of every SMMU
invalidated and synchronised before the change returns.

Choices where the series is ambiguous (collected into docs/pkvm-model.md):

- Invalidation granularity: the posted io-pgtable calls ``tlb_add_page`` once per unmapped page,
  each a range TLBI_S2_IPA + CMD_SYNC then TLBI_NH_ALL + CMD_SYNC on every SMMU. The model issues
  that sequence once per contiguous unmapped run: the same entries are invalidated, with fewer
  commands, and nothing returns before the last CMD_SYNC completed.
- Leftovers: the posted unmap loop returns at the first hole, so its "some memory were not
  unmapped" WARN can never fire. The model unmaps every mapped leaf of the range and warns about
  what it could not unmap (part of an MMIO block: blocks are never split).
- A change that leaves the host some access to a range that is still mapped (a permission change)
  is unmap + invalidate + map. The series only ever sees owner changes (none <-> RW).
- MMIO taken from the host after boot reaches the identity map here (the model's ownership code
  reports every change; the posted ``__pkvm_host_donate_hyp_mmio`` does not call the IOMMU). A page
  inside an MMIO block stays mapped and is warned about, as blocks are never split.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from pkvm_smmu.arch.vmsa import GRANULES
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.pgtable.allocator import PageAllocator
from pkvm_smmu.pgtable.config import PageTableConfig
from pkvm_smmu.pgtable.gather import TlbFlushOps
from pkvm_smmu.pgtable.memory import TableMemory
from pkvm_smmu.pgtable.prot import Prot
from pkvm_smmu.pgtable.table import IoPageTable, MapResult
from pkvm_smmu.trace.bus import TraceBus

COMPONENT = "hyp.iommu"
IDMAP_DEFAULT_BITS = 48  # smmu_init_pgt's starting IAS/OAS
_RW = Prot.READ | Prot.WRITE

# invalidate(iova, size, granule, leaf): every SMMU, TLBI + CMD_SYNC, done when it returns.
Invalidate = Callable[[int, int, int, bool], None]


@dataclass(frozen=True)
class IommuCaps:
    """What one IOMMU instance can walk (from the driver's probe)."""

    name: str
    ias: int
    oas: int
    pgsize_bitmap: int
    coherent: bool


def identity_config(caps: Sequence[IommuCaps]) -> PageTableConfig | None:
    """``smmu_init_pgt``: IAS/OAS the minimum (from 48), page sizes ANDed, coherent walk only if
    every instance is coherent; None unless every instance supports PAGE_SIZE (or when no stage-2
    table has that shape)."""
    ias = oas = IDMAP_DEFAULT_BITS
    bitmap = -1
    coherent = True
    for cap in caps:
        ias = min(ias, cap.ias)
        oas = min(oas, cap.oas)
        bitmap &= cap.pgsize_bitmap
        coherent = coherent and cap.coherent
    if not bitmap & PAGE_SIZE:
        return None
    try:
        base = PageTableConfig(stage=2, granule=GRANULES[PAGE_SIZE], ias=ias, oas=oas, coherent_walk=coherent)
    except ValueError:
        return None  # no stage-2 table can have this shape
    # io-pgtable keeps the sizes of the PAGE_SIZE granule (4K, 2M, 1G) the stage can reach.
    return replace(base, pgsize_bitmap=bitmap & base.pgsize_bitmap)


class IdentityPageTable(IoPageTable):
    """An ``IoPageTable`` with io-pgtable's ``map_pages``/``unmap_pages`` (a caller-chosen page
    size), which the identity map needs: memory strictly at PAGE_SIZE, MMIO with the largest
    blocks."""

    _forced_pgsize: int | None = None

    def map_pages(self, iova: int, pgsize: int, pgcount: int, prot: int) -> MapResult:
        self._forced_pgsize = pgsize
        try:
            return self.map(iova, iova, pgsize * pgcount, prot)
        finally:
            self._forced_pgsize = None

    def unmap_pages(self, iova: int, pgsize: int, pgcount: int) -> int:
        self._forced_pgsize = pgsize
        try:
            return self.unmap(iova, pgsize * pgcount)
        finally:
            self._forced_pgsize = None

    def _pgsize(self, iova: int, paddr: int, size: int) -> tuple[int, int]:
        forced = self._forced_pgsize
        if forced is None:
            return super()._pgsize(iova, paddr, size)
        return forced, size // forced


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _subtract(
    start: int, end: int, holes: list[tuple[int, int]], hole_starts: list[int]
) -> Iterator[tuple[int, int]]:
    """``[start, end)`` minus the merged, sorted ``holes``."""
    i = max(0, bisect.bisect_right(hole_starts, start) - 1)
    cursor = start
    while cursor < end and i < len(holes):
        h_start, h_end = holes[i]
        if h_end <= cursor:
            i += 1
            continue
        if h_start >= end:
            break
        if h_start > cursor:
            yield cursor, h_start
        cursor = max(cursor, h_end)
        i += 1
    if cursor < end:
        yield cursor, end


def host_accessible_runs(
    limit: int, memory: Iterable[tuple[int, int]], holes: Iterable[tuple[int, int]]
) -> list[tuple[int, int, bool]]:
    """``(start, end, is_mmio)`` runs of ``[0, limit)`` the host may access: memory regions
    (``(start, end)``) and everything between them as MMIO, minus the ``holes`` the host does not
    own. Page-aligned inputs give page-aligned runs."""
    mem = [(s, min(e, limit)) for s, e in _merge(memory) if s < limit]
    merged_holes = _merge(holes)
    starts = [h[0] for h in merged_holes]
    segments: list[tuple[int, int, bool]] = []
    cursor = 0
    for s, e in mem:
        if s > cursor:
            segments.append((cursor, s, True))
        segments.append((s, e, False))
        cursor = e
    if cursor < limit:
        segments.append((cursor, limit, True))
    runs: list[tuple[int, int, bool]] = []
    for s, e, is_mmio in segments:
        runs.extend((a, b, is_mmio) for a, b in _subtract(s, e, merged_holes, starts))
    return runs


class IdentityStage2:
    """The identity stage-2 (``idmap_pgtable``), its snapshot of host ownership and its updates.

    ``invalidate`` is the driver's TLB maintenance over every SMMU; it must have completed (each
    SMMU's CMD_SYNC consumed) when it returns.
    """

    def __init__(
        self,
        config: PageTableConfig,
        memory: TableMemory,
        allocator: PageAllocator,
        trace: TraceBus,
        invalidate: Invalidate,
        warn: Callable[..., None],
    ) -> None:
        self.config = config
        self.trace = trace
        self._invalidate = invalidate
        self._warn = warn
        self._limit = 1 << min(config.ias, config.oas)
        flush: TlbFlushOps = _WalkFlush(self)
        self.table = IdentityPageTable(config, memory, allocator, flush)
        self.invalidations = 0

    # -- what an STE needs --------------------------------------------------------------------------
    @property
    def root(self) -> int:
        """S2TTB."""
        return self.table.root

    def vtcr_fields(self) -> dict[str, int]:
        return self.config.vtcr_fields()

    @property
    def limit(self) -> int:
        """End of the input range the table maps (``BIT(oas)``)."""
        return self._limit

    # -- snapshot (kvm_iommu_snapshot_host_stage2) -----------------------------------------------------
    def build(self, memory: Iterable[tuple[int, int]], holes: Iterable[tuple[int, int]]) -> int:
        """Map every host-accessible page: memory RW+CACHE at PAGE_SIZE (a block could never be
        split when one of its pages leaves the host), MMIO RW+MMIO with the largest blocks that
        fit (MMIO is never taken from the host at run time). 0 or a negative errno."""
        mapped = 0
        ptes, pages = self.table.pte_writes, self.table.pages_allocated
        for start, end, is_mmio in host_accessible_runs(self._limit, memory, holes):
            result = self._map(start, end, _RW, is_mmio)
            mapped += result.mapped
            if result.error:
                self._warn("identity map build failed", start=start, end=end, error=result.error)
                return result.error
        if self.trace.enabled:
            self.trace.emit(
                COMPONENT,
                "idmap.build",
                bytes=mapped,
                pages=self.table.pages_allocated,
                entries=self.leaf_entries(),
                pte_writes=self.table.pte_writes - ptes,
                table_pages=self.table.pages_allocated - pages,
            )
        return 0

    def leaf_entries(self) -> int:
        return sum(run.entries for run in self.table.walk_runs())

    def _map(self, start: int, end: int, prot: int, is_mmio: bool) -> MapResult:
        if is_mmio:
            return self.table.map(start, start, end - start, prot | Prot.MMIO)
        return self.table.map_pages(start, PAGE_SIZE, (end - start) >> PAGE_SHIFT, prot | Prot.CACHE)

    # -- HostOwnershipListener ---------------------------------------------------------------------------
    def host_access_changed(self, pfn: int, nr_pages: int, prot: Prot, is_mmio: bool) -> None:
        """``smmu_host_stage2_idmap``: map what the host regained, unmap what it lost; TLBs of every
        SMMU invalidated and synchronised before returning."""
        start = pfn << PAGE_SHIFT
        end = min(start + (nr_pages << PAGE_SHIFT), self._limit)
        if start >= end:
            return
        self._remove(start, end)
        prot = Prot(prot) & _RW
        if not prot:
            return
        ptes, pages = self.table.pte_writes, self.table.pages_allocated
        result = self._map(start, end, prot, is_mmio)
        if self.trace.enabled:
            self.trace.emit(
                COMPONENT, "idmap.map", start=start, size=end - start, mmio=is_mmio, error=result.error,
                pte_writes=self.table.pte_writes - ptes, table_pages=self.table.pages_allocated - pages,
            )  # fmt: skip
        if result.error:
            self._warn("identity map failed", start=start, end=end, error=result.error)

    def _remove(self, start: int, end: int) -> None:
        """Unmap every PAGE_SIZE leaf of ``[start, end)``, then invalidate each unmapped run."""
        present = 0
        unmapped: list[tuple[int, int]] = []
        ptes, pages = self.table.pte_writes, self.table.pages_allocated
        for run in list(self.table.walk_runs(start, end)):
            lo = max(start, run.iova)
            hi = min(end, run.iova + run.size)
            present += hi - lo
            if run.pgsize != PAGE_SIZE:
                continue  # part of a block: io-pgtable cannot split it
            done = self.table.unmap_pages(lo, PAGE_SIZE, (hi - lo) >> PAGE_SHIFT)
            if done:
                if unmapped and unmapped[-1][1] == lo:
                    unmapped[-1] = (unmapped[-1][0], lo + done)
                else:
                    unmapped.append((lo, lo + done))
        removed = sum(b - a for a, b in unmapped)
        if removed and self.trace.enabled:
            self.trace.emit(
                COMPONENT, "idmap.unmap", start=start, size=end - start, unmapped=removed,
                pte_writes=self.table.pte_writes - ptes, table_pages=self.table.pages_allocated - pages,
            )  # fmt: skip
        for lo, hi in unmapped:
            self.invalidate(lo, hi - lo, PAGE_SIZE, True)
        if present != removed:
            self._warn(
                "identity map: some memory was not unmapped", start=start, end=end, left=present - removed
            )

    def invalidate(self, iova: int, size: int, granule: int, leaf: bool) -> None:
        self.invalidations += 1
        if self.trace.enabled:
            self.trace.emit(COMPONENT, "idmap.invalidate", start=iova, size=size, leaf=leaf)
        self._invalidate(iova, size, granule, leaf)


class _WalkFlush:
    """``iommu_flush_ops.tlb_flush_walk`` for table pages the library removes."""

    def __init__(self, idmap: IdentityStage2) -> None:
        self.idmap = idmap

    def tlb_flush_walk(self, iova: int, size: int, granule: int) -> None:
        self.idmap.invalidate(iova, size, granule, False)


__all__ = [
    "IDMAP_DEFAULT_BITS",
    "IdentityPageTable",
    "IdentityStage2",
    "Invalidate",
    "IommuCaps",
    "host_accessible_runs",
    "identity_config",
]
