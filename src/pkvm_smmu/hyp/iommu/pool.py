"""The IOMMU memory pool (v4 patches 11 and 26).

Pages are carved out of the hypervisor's memory before the host is deprivileged and handed to the
IOMMU driver through ``kvm_iommu_donate_pages``/``kvm_iommu_reclaim_pages``. The pool is also the
``PageAllocator`` of the identity stage-2 (patch 26: io-pgtable pages come from the IOMMU pool).
Running out is an error result (``None``), never an exception, and every allocation is a trace
event so reports can count the pages used.
"""

from __future__ import annotations

from typing import Protocol

from pkvm_smmu.machine.memory import PAGE_SIZE
from pkvm_smmu.pgtable.memory import TableMemory
from pkvm_smmu.trace.bus import TraceBus

COMPONENT = "hyp.iommu"


class PageSource(Protocol):
    """Where the pool's pages come from: the IOMMU's ``HypPool`` (physical addresses)."""

    def alloc_pages(self, count: int = 1) -> int | None: ...

    def free_pages(self, pa: int, count: int = 1) -> None: ...


class IommuPool:
    """``iommu_pages_pool``: zeroed pages for the identity stage-2 and the driver's shadow tables.

    ``source`` is the IOMMU's own ``HypPool`` (carved out for ``kvm_iommu_pages()``), or None when
    the driver asked for nothing: then every allocation fails. Addresses are physical.
    """

    def __init__(
        self,
        source: PageSource | None,
        memory: TableMemory,
        trace: TraceBus,
        *,
        granule_size: int = PAGE_SIZE,
    ) -> None:
        self.source = source
        self.memory = memory
        self.trace = trace
        self._granule_size = granule_size
        self._blocks: dict[int, int] = {}  # first page's PA -> pages, for every allocation held
        self.pages_in_use = 0
        self.peak_pages = 0

    @property
    def granule_size(self) -> int:
        return self._granule_size

    # -- kvm_iommu_donate_pages / kvm_iommu_reclaim_pages ------------------------------------------
    def alloc_pages(self, count: int) -> int | None:
        """``count`` (a power of two) contiguous zeroed pages aligned to their size, or None."""
        if count <= 0 or count & (count - 1):
            raise ValueError(f"alloc_pages({count}): count must be a power of two")
        pa = self._alloc_aligned(count) if self.source is not None else None
        if pa is None:
            if self.trace.enabled:
                self.trace.emit(COMPONENT, "pool.exhausted", pages=count, in_use=self.pages_in_use)
            return None
        self.memory.zero_page(pa, count * self._granule_size)
        self._blocks[pa] = count
        self.pages_in_use += count
        self.peak_pages = max(self.peak_pages, self.pages_in_use)
        if self.trace.enabled:
            self.trace.emit(COMPONENT, "pool.alloc", pa=pa, pages=count, in_use=self.pages_in_use)
        return pa

    def _alloc_aligned(self, count: int) -> int | None:
        """A block aligned to its size in physical memory (an L2 stream table must be, and pKVM's
        buddy allocator gives that); the source aligns blocks within its own range only, so a
        misaligned block is traded for a double-size one trimmed to the aligned half."""
        source = self.source
        assert source is not None
        pa = source.alloc_pages(count)
        size = count * self._granule_size
        if pa is None or not pa & (size - 1):
            return pa
        source.free_pages(pa, count)
        big = source.alloc_pages(2 * count)
        if big is None:
            return None
        pa = -(-big // size) * size
        if pa > big:
            source.free_pages(big, (pa - big) // self._granule_size)
        tail = big + 2 * size - (pa + size)
        if tail:
            source.free_pages(pa + size, tail // self._granule_size)
        return pa

    def alloc_page(self) -> int | None:
        return self.alloc_pages(1)

    def free_pages(self, pa: int, count: int) -> None:
        """Give back an allocation (a hypervisor bug, raised, if it is not one of ours)."""
        if self._blocks.get(pa) != count or self.source is None:
            raise ValueError(f"free_pages({pa:#x}, {count}): not an allocation of this pool")
        del self._blocks[pa]
        self.source.free_pages(pa, count)
        self.pages_in_use -= count
        if self.trace.enabled:
            self.trace.emit(COMPONENT, "pool.free", pa=pa, pages=count, in_use=self.pages_in_use)

    def free_page(self, pa: int) -> None:
        self.free_pages(pa, 1)


__all__ = ["IommuPool", "PageSource"]
