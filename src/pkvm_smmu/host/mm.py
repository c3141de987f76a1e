"""Host physical memory management: the page allocator over firmware's RAM and the adapters the
page-table library needs.

Everything here reaches memory through the host's EL1 ``Cpu`` port, so once pKVM is up every
write (zeroing, page-table stores) passes the host stage-2. A faulting access is returned as an
error (None or a negative errno), never raised, except through the ``TableMemory`` protocol,
whose documented error channel is ``TableMemoryAbort``.
"""

from __future__ import annotations

import errno
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

from pkvm_smmu.host.hw import Cpu, is_fault
from pkvm_smmu.pgtable.memory import Buffer, TableMemoryAbort
from pkvm_smmu.trace import TraceBus

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
COMPONENT = "host.mm"
# Zeroing writes at most this much per CPU access so a large allocation does not build one huge buffer.
_ZERO_CHUNK = 1 << 20


class PageRanges:
    """A set of page frame numbers kept as sorted, disjoint, coalesced ``[start, end)`` runs."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, runs: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in runs:
            self.add(start, end)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def total(self) -> int:
        return sum(end - start for start, end in self)

    def add(self, start: int, end: int) -> None:
        """Insert ``[start, end)``, merging with every run it touches or overlaps."""
        if start >= end:
            return
        lo = bisect_left(self._ends, start)  # first run that ends at or after start
        hi = bisect_right(self._starts, end)  # runs before hi start at or before end
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def remove(self, start: int, end: int) -> None:
        """Remove ``[start, end)`` (parts outside the set are ignored), splitting runs as needed."""
        if start >= end:
            return
        lo = bisect_right(self._ends, start)  # first run ending after start
        hi = bisect_left(self._starts, end)  # runs before hi start before end
        if lo >= hi:
            return
        keep_starts: list[int] = []
        keep_ends: list[int] = []
        if self._starts[lo] < start:
            keep_starts.append(self._starts[lo])
            keep_ends.append(start)
        if self._ends[hi - 1] > end:
            keep_starts.append(end)
            keep_ends.append(self._ends[hi - 1])
        self._starts[lo:hi] = keep_starts
        self._ends[lo:hi] = keep_ends

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect_right(self._ends, start)
        return i < len(self._starts) and self._starts[i] < end and start < end

    def covers(self, start: int, end: int) -> bool:
        """True when every page of ``[start, end)`` is in the set."""
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def intersection(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        i = bisect_right(self._ends, start)
        while i < len(self._starts) and self._starts[i] < end:
            yield max(start, self._starts[i]), min(end, self._ends[i])
            i += 1


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


class HostMemory:
    """The host kernel's page allocator (the buddy allocator's role) over firmware's RAM ranges.

    First fit from the lowest address, so runs are deterministic and the low (32-bit DMA-able)
    memory is used first. Freed runs coalesce with their neighbours. Pages never handed out are
    known to read as zero (fresh RAM), so a zeroed allocation writes only pages that were used
    before (``fresh_is_zero=False`` when firmware may leave data in RAM it does not reserve).

    ``ram`` and ``reserved`` are ``(base, size)`` byte ranges; partial pages at the edges of a RAM
    range are not managed.
    """

    def __init__(
        self,
        cpu: Cpu,
        ram: Iterable[tuple[int, int]],
        reserved: Iterable[tuple[int, int]] = (),
        trace: TraceBus | None = None,
        *,
        fresh_is_zero: bool = True,
    ) -> None:
        self.cpu = cpu
        self.trace = trace if trace is not None else TraceBus()
        self._managed = PageRanges()
        for base, size in ram:
            first, last = _align_up(base, PAGE_SIZE) >> PAGE_SHIFT, (base + size) >> PAGE_SHIFT
            self._managed.add(first, last)
        for base, size in reserved:
            self._managed.remove(base >> PAGE_SHIFT, _align_up(base + size, PAGE_SIZE) >> PAGE_SHIFT)
        self._free = PageRanges(self._managed)
        # Pages whose contents may be non-zero: handed out before, or (when firmware may have left
        # data in RAM it did not reserve) all of it.
        self._dirty = PageRanges() if fresh_is_zero else PageRanges(self._managed)

    # -- state ------------------------------------------------------------------------------------
    @property
    def pages_total(self) -> int:
        return self._managed.total

    @property
    def pages_free(self) -> int:
        return self._free.total

    @property
    def pages_in_use(self) -> int:
        return self.pages_total - self.pages_free

    def free_runs(self) -> list[tuple[int, int]]:
        """Free memory as ``(pa, size)`` byte ranges, lowest first."""
        return [(start << PAGE_SHIFT, (end - start) << PAGE_SHIFT) for start, end in self._free]

    def managed_runs(self) -> list[tuple[int, int]]:
        return [(start << PAGE_SHIFT, (end - start) << PAGE_SHIFT) for start, end in self._managed]

    # -- reservations -----------------------------------------------------------------------------
    def reserve(self, base: int, size: int) -> int:
        """Take ``[base, base + size)`` out of the allocator for good (a firmware or hypervisor
        carve-out). 0, or -EBUSY when part of it is in use, -EINVAL when it is not managed RAM."""
        first, last = base >> PAGE_SHIFT, _align_up(base + size, PAGE_SIZE) >> PAGE_SHIFT
        if size <= 0 or base < 0 or not self._managed.covers(first, last):
            return -errno.EINVAL
        if not self._free.covers(first, last):
            return -errno.EBUSY
        self._free.remove(first, last)
        self._managed.remove(first, last)
        self._emit("reserve", pa=first << PAGE_SHIFT, pages=last - first)
        return 0

    # -- pages ------------------------------------------------------------------------------------
    def alloc_pages(self, count: int, align: int = 1, *, limit: int | None = None) -> int | None:
        """``count`` physically contiguous pages whose first pfn is a multiple of ``align`` (pages)
        and whose last byte is at or below ``limit`` (a DMA zone). Contents are not cleared."""
        if count <= 0 or align <= 0:
            return None
        limit_pfn = None if limit is None else (limit + 1) >> PAGE_SHIFT  # exclusive
        for start, end in self._free:
            first = _align_up(start, align)
            if limit_pfn is not None and first + count > limit_pfn:
                break
            if first + count <= end:
                self._free.remove(first, first + count)
                self._emit("alloc", pa=first << PAGE_SHIFT, pages=count)
                return first << PAGE_SHIFT
        self._emit("alloc.fail", pages=count, align=align, limit=limit)
        return None

    def free_pages(self, pa: int, count: int) -> int:
        """Give back ``count`` pages from ``pa``: 0, or -EINVAL for a range that is not wholly
        allocated (a double free or a stray address; nothing is freed)."""
        first = pa >> PAGE_SHIFT
        if count <= 0 or pa & (PAGE_SIZE - 1) or not self._managed.covers(first, first + count):
            self._emit("free.bad", pa=pa, pages=count)
            return -errno.EINVAL
        if self._free.overlaps(first, first + count):
            self._emit("free.bad", pa=pa, pages=count)
            return -errno.EINVAL
        self._dirty.add(first, first + count)
        self._free.add(first, first + count)
        self._emit("free", pa=pa, pages=count)
        return 0

    def clear_pages(self, pa: int, count: int) -> int:
        """Zero ``count`` pages through the CPU port, skipping pages never handed out before.
        0, or -EFAULT when a write faulted."""
        first = pa >> PAGE_SHIFT
        for start, end in list(self._dirty.intersection(first, first + count)):
            addr, stop = start << PAGE_SHIFT, end << PAGE_SHIFT
            while addr < stop:
                chunk = min(_ZERO_CHUNK, stop - addr)
                if is_fault(self.cpu.write_bytes(addr, bytes(chunk))):
                    self._emit("fault", pa=addr, op="clear")
                    return -errno.EFAULT
                addr += chunk
        self._dirty.remove(first, first + count)
        return 0

    def alloc_zeroed_pages(self, count: int, align: int = 1, *, limit: int | None = None) -> int | None:
        """As ``alloc_pages``, zeroed; None (nothing kept) if memory ran out or zeroing faulted."""
        pa = self.alloc_pages(count, align, limit=limit)
        if pa is None:
            return None
        if self.clear_pages(pa, count):
            self.free_pages(pa, count)
            return None
        return pa

    def dma_alloc_coherent(self, size: int, *, limit: int | None = None) -> int | None:
        """Zeroed, physically contiguous memory for ``size`` bytes (whole pages, aligned to the
        power-of-two order that holds them, as the buddy allocator returns)."""
        if size <= 0:
            return None
        count = _align_up(size, PAGE_SIZE) >> PAGE_SHIFT
        return self.alloc_zeroed_pages(count, 1 << (count - 1).bit_length(), limit=limit)

    def dma_free_coherent(self, pa: int, size: int) -> int:
        return self.free_pages(pa, _align_up(size, PAGE_SIZE) >> PAGE_SHIFT)

    def _emit(self, kind: str, **fields: object) -> None:
        if self.trace.enabled:
            self.trace.emit(COMPONENT, kind, **fields)


class HostMemoryFault(TableMemoryAbort):
    """A page-table access by the host faulted (e.g. the page is no longer the host's)."""

    def __init__(self, fault: object, address: int, is_write: bool) -> None:
        RuntimeError.__init__(
            self, f"host page-table {'write' if is_write else 'read'} at {address:#x} faulted: {fault}"
        )
        self.fault = fault
        self.address = address
        self.is_write = is_write
        self.abort = fault  # type: ignore[assignment]  # what the port returned, for the report


class HostTableMemory:
    """The page-table library's ``TableMemory`` over the host's CPU port.

    Faults raise ``HostMemoryFault`` (a ``TableMemoryAbort``): the protocol has no error return,
    and a host page-table access that faults is a kernel data abort. The IOMMU core catches it at
    the driver boundary and turns it into -EFAULT.
    """

    __slots__ = ("cpu",)

    def __init__(self, cpu: Cpu) -> None:
        self.cpu = cpu

    def read_u64(self, pa: int) -> int:
        value = self.cpu.read(pa, 8)
        if not isinstance(value, int):
            raise HostMemoryFault(value, pa, False)
        return value

    def write_u64(self, pa: int, value: int) -> None:
        result = self.cpu.write(pa, 8, value)
        if is_fault(result):
            raise HostMemoryFault(result, pa, True)

    def read_table(self, pa: int, length: int) -> bytes:
        data = self.cpu.read_bytes(pa, length)
        if not isinstance(data, bytes):
            raise HostMemoryFault(data, pa, False)
        return data

    def write_table(self, pa: int, data: Buffer) -> None:
        result = self.cpu.write_bytes(pa, bytes(memoryview(data).cast("B")))
        if is_fault(result):
            raise HostMemoryFault(result, pa, True)

    def zero_page(self, pa: int, size: int = PAGE_SIZE) -> None:
        result = self.cpu.write_bytes(pa, bytes(size))
        if is_fault(result):
            raise HostMemoryFault(result, pa, True)


class HostPageAllocator:
    """The host allocator as a page-table ``PageAllocator``: zeroed 4 KiB pages, None when out of
    memory or when zeroing faulted."""

    def __init__(self, mm: HostMemory) -> None:
        self.mm = mm

    @property
    def granule_size(self) -> int:
        return PAGE_SIZE

    def alloc_page(self) -> int | None:
        return self.mm.alloc_zeroed_pages(1)

    def alloc_pages(self, count: int) -> int | None:
        if count <= 0 or count & (count - 1):
            return None
        return self.mm.alloc_zeroed_pages(count, count)

    def free_page(self, pa: int) -> None:
        self.mm.free_pages(pa, 1)  # a bad free is traced by the allocator and changes nothing

    def free_pages(self, pa: int, count: int) -> None:
        self.mm.free_pages(pa, count)
