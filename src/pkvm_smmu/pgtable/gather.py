"""What an unmap changed, so the caller can invalidate the IOTLB afterwards (iommu_iotlb_gather)."""

from __future__ import annotations

from typing import NamedTuple, Protocol


class TlbFlushOps(Protocol):
    """Synchronous invalidation a page table may ask for (Linux ``iommu_flush_ops``)."""

    def tlb_flush_walk(self, iova: int, size: int, granule: int) -> None:
        """Invalidate TLB and walk-cache entries for ``[iova, iova + size)`` and wait for it."""
        ...


class GatherRange(NamedTuple):
    """``[start, end)`` to invalidate; ``pgsize`` is the size of the entries the TLB may hold
    there (the TTL/TG hint); ``leaf`` False when table entries went too (walk caches)."""

    start: int
    end: int
    pgsize: int
    leaf: bool


class IotlbGather:
    """Accumulates invalidation ranges and table pages freed by unmaps.

    Freed table pages stay allocated until ``IoPageTable.release_freed_tables(gather)``, which the
    caller calls once the invalidation (TLBI + SYNC) is complete: a walk cache may still point
    at them until then.
    """

    __slots__ = ("freed_tables", "ranges")

    def __init__(self) -> None:
        self.ranges: list[GatherRange] = []
        self.freed_tables: list[int] = []

    def add_page(self, iova: int, size: int, pgsize: int | None = None, *, leaf: bool = True) -> None:
        """Record ``[iova, iova + size)``, merging with the previous range when contiguous and alike."""
        pgsize = size if pgsize is None else pgsize
        if self.ranges:
            last = self.ranges[-1]
            if last.end == iova and last.pgsize == pgsize and last.leaf == leaf:
                self.ranges[-1] = last._replace(end=iova + size)
                return
        self.ranges.append(GatherRange(iova, iova + size, pgsize, leaf))

    def add_freed_table(self, pa: int) -> None:
        self.freed_tables.append(pa)

    @property
    def empty(self) -> bool:
        return not self.ranges and not self.freed_tables

    @property
    def start(self) -> int | None:
        return min(r.start for r in self.ranges) if self.ranges else None

    @property
    def end(self) -> int | None:
        """Exclusive end of the union of the ranges."""
        return max(r.end for r in self.ranges) if self.ranges else None

    @property
    def pgsizes(self) -> frozenset[int]:
        return frozenset(r.pgsize for r in self.ranges)

    @property
    def pgsize(self) -> int | None:
        """The one entry size involved, or None when mixed (no single TTL hint is right)."""
        sizes = self.pgsizes
        return next(iter(sizes)) if len(sizes) == 1 else None

    @property
    def leaf_only(self) -> bool:
        """True when only leaf entries changed (TLBI with Leaf=1 suffices)."""
        return all(r.leaf for r in self.ranges)

    def reset(self) -> None:
        self.ranges.clear()
        self.freed_tables.clear()

    def __repr__(self) -> str:
        spans = ", ".join(
            f"[{r.start:#x},{r.end:#x})/{r.pgsize:#x}{'' if r.leaf else ' walk'}" for r in self.ranges
        )
        return f"IotlbGather({spans}; freed={len(self.freed_tables)})"
