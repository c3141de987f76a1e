"""``struct hyp_pool``: the hypervisor's buddy page allocator over a range of pages it owns.

The hyp carveout is split into pools (the hyp's own, the IOMMU driver's: v4 patch 11). Blocks are
naturally aligned within the pool, handed out lowest address first, and zeroed when allocated, as
pKVM's ``hyp_alloc_pages`` returns zeroed memory. Exhaustion returns None; freeing a page that is
not allocated is a hypervisor bug (pKVM BUGs) and raises ``ValueError``.
"""

from __future__ import annotations

import heapq

from pkvm_smmu.machine.memory import PAGE_SHIFT, Ram
from pkvm_smmu.trace import TraceBus

MAX_PAGE_ORDER = 10


class HypPool:
    def __init__(
        self,
        base_pfn: int,
        nr_pages: int,
        *,
        ram: Ram | None = None,
        name: str = "hyp",
        trace: TraceBus | None = None,
        max_order: int = MAX_PAGE_ORDER,
    ) -> None:
        if base_pfn < 0 or nr_pages < 0:
            raise ValueError(f"hyp pool {name}: bad range {base_pfn:#x}+{nr_pages}")
        self.base_pfn = base_pfn
        self.nr_pages = nr_pages
        self.name = name
        self._ram = ram
        self._trace = trace
        self.max_order = max(0, min(max_order, nr_pages.bit_length() - 1)) if nr_pages else 0
        # Free blocks by order, as pool offsets: a set for membership and a heap for lowest-first.
        self._free: list[set[int]] = [set() for _ in range(self.max_order + 1)]
        self._heaps: list[list[int]] = [[] for _ in range(self.max_order + 1)]
        self._allocated: dict[int, int] = {}  # offset -> order
        self._free_pages = 0
        offset = 0
        while offset < nr_pages:
            order = self.max_order
            while order and (offset & ((1 << order) - 1) or offset + (1 << order) > nr_pages):
                order -= 1
            self._push(offset, order)
            self._free_pages += 1 << order
            offset += 1 << order
        self.peak_used = 0

    # -- accounting -----------------------------------------------------------------------------
    @property
    def free_page_count(self) -> int:
        return self._free_pages

    @property
    def used_pages(self) -> int:
        return self.nr_pages - self._free_pages

    def contains(self, pfn: int) -> bool:
        return self.base_pfn <= pfn < self.base_pfn + self.nr_pages

    def is_allocated(self, pfn: int) -> bool:
        return (pfn - self.base_pfn) in self._allocated

    # -- allocation -----------------------------------------------------------------------------
    def alloc_page(self) -> int | None:
        return self.alloc_pages(0)

    def alloc_pages(self, order: int = 0) -> int | None:
        """A zeroed, naturally aligned block of ``2**order`` pages; its first pfn, or None."""
        if order < 0 or order > self.max_order:
            return self._traced("alloc", None, order)
        found = next((o for o in range(order, self.max_order + 1) if self._free[o]), None)
        if found is None:
            return self._traced("alloc", None, order)
        offset = self._pop(found)
        while found > order:
            found -= 1
            self._push(offset + (1 << found), found)
        self._allocated[offset] = order
        self._free_pages -= 1 << order
        self.peak_used = max(self.peak_used, self.used_pages)
        pfn = self.base_pfn + offset
        if self._ram is not None:
            self._ram.zero(pfn << PAGE_SHIFT, (1 << order) << PAGE_SHIFT)
        return self._traced("alloc", pfn, order)

    def free_page(self, pfn: int) -> None:
        self.free_pages(pfn)

    def free_pages(self, pfn: int) -> None:
        """Return the block that ``alloc_pages`` returned at ``pfn``, merging free buddies."""
        offset = pfn - self.base_pfn
        order = self._allocated.pop(offset, None)
        if order is None:
            raise ValueError(f"hyp pool {self.name}: freeing pfn {pfn:#x}, which is not allocated")
        self._free_pages += 1 << order
        while order < self.max_order:
            buddy = offset ^ (1 << order)
            if buddy not in self._free[order]:
                break
            self._free[order].discard(buddy)  # its heap entry is skipped lazily
            offset = min(offset, buddy)
            order += 1
        self._push(offset, order)
        self._traced("free", pfn, order)

    # -- internals ------------------------------------------------------------------------------
    def _push(self, offset: int, order: int) -> None:
        self._free[order].add(offset)
        heapq.heappush(self._heaps[order], offset)

    def _pop(self, order: int) -> int:
        heap, free = self._heaps[order], self._free[order]
        while True:
            offset = heapq.heappop(heap)
            if offset in free:
                free.discard(offset)
                return offset

    def _traced(self, kind: str, pfn: int | None, order: int) -> int | None:
        trace = self._trace
        if trace is not None and trace.enabled:
            trace.emit("hyp", f"pool.{kind}", pool=self.name, pfn=pfn, order=order, used=self.used_pages)
        return pfn
