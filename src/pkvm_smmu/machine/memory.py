"""Sparse RAM backing store: pages are materialised on first write, untouched pages read as zero."""

from __future__ import annotations

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
_ZERO_PAGE = bytes(PAGE_SIZE)


class Ram:
    """Byte storage for every RAM region of the machine, keyed by page frame number.

    It knows nothing of regions or initiators (that is the bus); addresses are physical.
    """

    __slots__ = ("_pages",)

    def __init__(self) -> None:
        self._pages: dict[int, bytearray] = {}

    @property
    def pages_backed(self) -> int:
        """Number of pages that hold storage (pages ever written)."""
        return len(self._pages)

    def page(self, pfn: int) -> bytearray:
        """The page's storage, materialised if needed (for bulk writers such as page-table builders)."""
        page = self._pages.get(pfn)
        if page is None:
            page = self._pages[pfn] = bytearray(PAGE_SIZE)
        return page

    def page_if_backed(self, pfn: int) -> bytearray | None:
        return self._pages.get(pfn)

    def read_int(self, addr: int, size: int) -> int:
        offset = addr & PAGE_MASK
        if offset + size <= PAGE_SIZE:
            page = self._pages.get(addr >> PAGE_SHIFT)
            if page is None:
                return 0
            return int.from_bytes(page[offset : offset + size], "little")
        return int.from_bytes(self.read(addr, size), "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        offset = addr & PAGE_MASK
        if offset + size <= PAGE_SIZE:
            self.page(addr >> PAGE_SHIFT)[offset : offset + size] = data
        else:
            self.write(addr, data)

    def read(self, addr: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            offset = addr & PAGE_MASK
            chunk = min(length, PAGE_SIZE - offset)
            page = self._pages.get(addr >> PAGE_SHIFT)
            out += _ZERO_PAGE[:chunk] if page is None else page[offset : offset + chunk]
            addr += chunk
            length -= chunk
        return bytes(out)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            offset = addr & PAGE_MASK
            chunk = min(len(view), PAGE_SIZE - offset)
            self.page(addr >> PAGE_SHIFT)[offset : offset + chunk] = view[:chunk]
            addr += chunk
            view = view[chunk:]

    def zero(self, addr: int, length: int) -> None:
        """Zero a range; whole pages are released rather than written."""
        while length > 0:
            offset = addr & PAGE_MASK
            chunk = min(length, PAGE_SIZE - offset)
            pfn = addr >> PAGE_SHIFT
            if chunk == PAGE_SIZE:
                self._pages.pop(pfn, None)
            elif pfn in self._pages:
                self._pages[pfn][offset : offset + chunk] = bytes(chunk)
            addr += chunk
            length -= chunk
