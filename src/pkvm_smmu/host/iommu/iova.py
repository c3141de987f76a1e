"""The IOVA allocator (Linux ``iova.c``): page-frame ranges handed out top-down below a limit.

Differences from Linux, all deterministic: there are no per-CPU range caches (``rcache``) and no
cached search node, so an allocation always takes the highest free range that fits under the
limit. ``size_aligned`` aligns a range to its size rounded up to a power of two, as
``fls_long(size - 1)`` does.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import NamedTuple


class Iova(NamedTuple):
    """An allocated range of page frames, ``[pfn_lo, pfn_hi]`` inclusive as in Linux."""

    pfn_lo: int
    pfn_hi: int

    @property
    def size(self) -> int:
        return self.pfn_hi - self.pfn_lo + 1


class IovaDomain:
    """One IOVA space with granule ``granule`` bytes; pfns below ``start_pfn`` are never used
    (Linux starts at 1 so that IOVA 0 is never a valid DMA address)."""

    def __init__(self, granule: int, start_pfn: int = 1) -> None:
        if granule <= 0 or granule & (granule - 1):
            raise ValueError(f"IOVA granule {granule:#x} is not a power of two")
        self.granule = granule
        self.shift = granule.bit_length() - 1
        self.start_pfn = max(0, start_pfn)
        # Allocated and reserved ranges, sorted and disjoint: parallel lists of inclusive bounds.
        self._los: list[int] = []
        self._his: list[int] = []
        self._reserved: set[int] = set()  # pfn_lo of ranges that reserve_iova made

    # -- geometry helpers (iova_offset, iova_align, iova_pfn) ------------------------------------
    def iova_offset(self, iova: int) -> int:
        return iova & (self.granule - 1)

    def iova_align(self, size: int) -> int:
        return -(-size // self.granule) * self.granule

    def iova_pfn(self, iova: int) -> int:
        return iova >> self.shift

    # -- allocation ------------------------------------------------------------------------------
    def alloc_iova(self, size: int, limit_pfn: int, size_aligned: bool = True) -> Iova | None:
        """``size`` pages ending at or below ``limit_pfn`` (inclusive), the highest that fit."""
        if size <= 0 or limit_pfn < self.start_pfn:
            return None
        align = 1 << (size - 1).bit_length() if size_aligned else 1
        high = limit_pfn + 1  # exclusive top of the hole being tried
        i = bisect_right(self._los, limit_pfn)  # ranges [0, i) start at or below the limit
        while True:
            low = self._his[i - 1] + 1 if i else self.start_pfn
            low = max(low, self.start_pfn)
            top = min(high, self._los[i] if i < len(self._los) else high)
            if top - size >= low:
                candidate = (top - size) // align * align
                if candidate >= low:
                    return self._insert(candidate, candidate + size - 1)
            if not i:
                return None
            i -= 1
            high = self._los[i]

    def _insert(self, lo: int, hi: int) -> Iova:
        i = bisect_left(self._los, lo)
        self._los.insert(i, lo)
        self._his.insert(i, hi)
        return Iova(lo, hi)

    def find_iova(self, pfn: int) -> Iova | None:
        """The allocated range holding ``pfn``."""
        i = bisect_right(self._los, pfn) - 1
        if i >= 0 and self._his[i] >= pfn:
            return Iova(self._los[i], self._his[i])
        return None

    def free_iova(self, pfn: int) -> bool:
        """Free the allocation that holds ``pfn``; False if there is none (or it is reserved)."""
        i = bisect_right(self._los, pfn) - 1
        if i < 0 or self._his[i] < pfn or self._los[i] in self._reserved:
            return False
        del self._los[i], self._his[i]
        return True

    def reserve_iova(self, pfn_lo: int, pfn_hi: int) -> bool:
        """Keep ``[pfn_lo, pfn_hi]`` out of allocations for good (an MSI window, an RMR).

        Merges with reservations it overlaps; False when it overlaps an allocation."""
        if pfn_lo > pfn_hi:
            return False
        first = bisect_right(self._his, pfn_lo - 1)  # first range ending at or after pfn_lo
        last = bisect_right(self._los, pfn_hi)  # ranges before last start at or before pfn_hi
        overlapped = list(zip(self._los[first:last], self._his[first:last], strict=True))
        if any(lo not in self._reserved for lo, _ in overlapped):
            return False
        for lo, hi in overlapped:
            self._reserved.discard(lo)
            pfn_lo, pfn_hi = min(pfn_lo, lo), max(pfn_hi, hi)
        del self._los[first:last], self._his[first:last]
        self._insert(pfn_lo, pfn_hi)
        self._reserved.add(pfn_lo)
        return True

    @property
    def allocated(self) -> list[Iova]:
        """Allocated ranges (not reservations), lowest first."""
        return [Iova(lo, hi) for lo, hi in zip(self._los, self._his, strict=True) if lo not in self._reserved]

    @property
    def reserved(self) -> list[Iova]:
        return [Iova(lo, hi) for lo, hi in zip(self._los, self._his, strict=True) if lo in self._reserved]
