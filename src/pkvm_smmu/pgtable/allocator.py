"""Where table pages come from: a protocol and a simple allocator over a physical range."""

from __future__ import annotations

from typing import Protocol

from pkvm_smmu.pgtable.memory import TableMemory


class PageAllocator(Protocol):
    """Hands out zeroed, naturally aligned pages of ``granule_size`` bytes; None when exhausted."""

    @property
    def granule_size(self) -> int: ...

    def alloc_page(self) -> int | None: ...

    def free_page(self, pa: int) -> None: ...

    def alloc_pages(self, count: int) -> int | None:
        """``count`` (a power of two) physically contiguous pages aligned to their total size,
        for a concatenated stage-2 start level."""
        ...

    def free_pages(self, pa: int, count: int) -> None: ...


class RangePageAllocator:
    """A free-list allocator over ``[base, base + size)``.

    Never-used pages are handed out by a bump pointer; freed pages are reused last-freed first.
    """

    def __init__(self, base: int, size: int, granule_size: int = 4096, *, memory: TableMemory) -> None:
        if granule_size & (granule_size - 1) or base % granule_size or size % granule_size or size <= 0:
            raise ValueError(f"range {base:#x}+{size:#x} is not made of {granule_size:#x}-byte pages")
        self.base = base
        self.size = size
        self._granule_size = granule_size
        self.memory = memory
        self._next = base
        self._free: list[int] = []
        self._in_use: set[int] = set()
        self.peak_pages = 0

    @property
    def granule_size(self) -> int:
        return self._granule_size

    @property
    def pages_in_use(self) -> int:
        return len(self._in_use)

    @property
    def pages_free(self) -> int:
        return len(self._free) + (self.base + self.size - self._next) // self._granule_size

    def _take(self, pa: int) -> int:
        self.memory.zero_page(pa, self._granule_size)
        self._in_use.add(pa)
        if len(self._in_use) > self.peak_pages:
            self.peak_pages = len(self._in_use)
        return pa

    def alloc_page(self) -> int | None:
        if self._free:
            return self._take(self._free.pop())
        if self._next < self.base + self.size:
            pa = self._next
            self._next += self._granule_size
            return self._take(pa)
        return None

    def alloc_pages(self, count: int) -> int | None:
        if count == 1:
            return self.alloc_page()
        if count <= 0 or count & (count - 1):
            raise ValueError(f"alloc_pages({count}): count must be a power of two")
        span = count * self._granule_size
        start = -(-self._next // span) * span
        if start + span > self.base + self.size:
            return None
        # Pages skipped to reach the alignment stay usable as single pages.
        self._free.extend(range(start - self._granule_size, self._next - 1, -self._granule_size))
        self._next = start + span
        for pa in range(start, start + span, self._granule_size):
            self._take(pa)
        return start

    def free_page(self, pa: int) -> None:
        if pa not in self._in_use:
            raise ValueError(f"free_page({pa:#x}): page is not allocated")
        self._in_use.remove(pa)
        self._free.append(pa)

    def free_pages(self, pa: int, count: int) -> None:
        for i in range(count):
            self.free_page(pa + i * self._granule_size)
