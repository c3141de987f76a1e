"""``struct hyp_pool``: the hypervisor's buddy page allocator over a range of pages it owns.

The hyp carveout is split into pools (the hyp's own, the IOMMU driver's: v4 patch 11). Addresses are
physical. Blocks are naturally aligned in the physical address space (as pKVM's buddy allocator
aligns them, so a 16 KiB block is 16 KiB-aligned), handed out lowest address first, and zeroed
when allocated, as pKVM's ``hyp_alloc_pages`` returns zeroed memory. Exhaustion returns None; freeing
a page that is not allocated is a hypervisor bug (pKVM BUGs) and raises ``ValueError``.
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
        # Free blocks by order, as absolute pfns: a set for membership and a heap for lowest-first.
        self._free: list[set[int]] = [set() for _ in range(self.max_order + 1)]
        self._heaps: list[list[int]] = [[] for _ in range(self.max_order + 1)]
        self._allocated: set[int] = set()  # pfns of pages in use
        self._free_pages = 0
        offset, end = base_pfn, base_pfn + nr_pages
        while offset < end:
            order = self.max_order
            while order and (offset & ((1 << order) - 1) or offset + (1 << order) > end):
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

    def contains(self, pa: int) -> bool:
        return self.base_pfn <= pa >> PAGE_SHIFT < self.base_pfn + self.nr_pages

    def is_allocated(self, pa: int) -> bool:
        return pa >> PAGE_SHIFT in self._allocated

    # -- allocation -----------------------------------------------------------------------------
    def alloc_page(self) -> int | None:
        """One zeroed page: its physical address, or None when the pool is exhausted."""
        return self.alloc_pages(1)

    def alloc_pages(self, count: int = 1) -> int | None:
        """``count`` zeroed contiguous pages, aligned to the power of two that covers them (the
        buddy block; pages past ``count`` go straight back, as ``alloc_pages_exact``). The block is
        split (``hyp_split_page``): each page is freed on its own. Physical address, or None."""
        if count <= 0 or count > (1 << self.max_order) or not self.nr_pages:
            return self._traced("alloc", None, count)
        order = (count - 1).bit_length()
        found = next((o for o in range(order, self.max_order + 1) if self._free[o]), None)
        if found is None:
            return self._traced("alloc", None, count)
        offset = self._pop(found)
        while found > order:
            found -= 1
            self._push(offset + (1 << found), found)
        for page in range(offset, offset + (1 << order)):
            self._allocated.add(page)
        self._free_pages -= 1 << order
        for page in range(offset + count, offset + (1 << order)):
            self._release(page)
        self.peak_used = max(self.peak_used, self.used_pages)
        pa = offset << PAGE_SHIFT
        if self._ram is not None:
            self._ram.zero(pa, count << PAGE_SHIFT)
        return self._traced("alloc", pa, count)

    def free_page(self, pa: int) -> None:
        self.free_pages(pa, 1)

    def free_pages(self, pa: int, count: int = 1) -> None:
        """Return ``count`` pages starting at ``pa``, merging free buddies."""
        first = pa >> PAGE_SHIFT
        pages = range(first, first + count)
        if pa & ((1 << PAGE_SHIFT) - 1) or any(page not in self._allocated for page in pages):
            raise ValueError(f"hyp pool {self.name}: freeing {pa:#x}+{count} pages, not allocated")
        for page in pages:
            self._release(page)
        self._traced("free", pa, count)

    # -- internals ------------------------------------------------------------------------------
    def _release(self, offset: int) -> None:
        self._allocated.discard(offset)
        self._free_pages += 1
        order = 0
        while order < self.max_order:
            buddy = offset ^ (1 << order)
            if buddy not in self._free[order]:
                break
            self._free[order].discard(buddy)  # its heap entry is skipped lazily
            offset = min(offset, buddy)
            order += 1
        self._push(offset, order)

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

    def _traced(self, kind: str, pa: int | None, pages: int) -> int | None:
        trace = self._trace
        if trace is not None and trace.enabled:
            trace.emit("hyp", f"pool.{kind}", pool=self.name, pa=pa, pages=pages, used=self.used_pages)
        return pa
