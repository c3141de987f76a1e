"""Host memory: the page allocator over firmware RAM, zeroing through the CPU port, faults, and the
page-table adapters."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm_smmu.arch.vmsa import GRANULES
from pkvm_smmu.host.mm import (
    PAGE_SIZE,
    HostMemory,
    HostMemoryFault,
    HostPageAllocator,
    HostTableMemory,
    PageRanges,
)
from pkvm_smmu.machine.bus import HOST_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuPort
from pkvm_smmu.pgtable import IoPageTable, PageTableConfig, Prot, TableMemoryAbort
from pkvm_smmu.trace import RecordingSink, TraceBus

BANK0 = (0x4000_0000, 0x10_0000)  # 1 MiB: 256 pages
BANK1 = (0x8000_0000, 0x8_0000)  # 512 KiB: 128 pages


def make_cpu(*banks: tuple[int, int]) -> CpuPort:
    bus = SystemBus()
    for base, size in banks:
        bus.add_ram(base, size)
    return CpuPort(bus, Clock(), HOST_CPU)


def make_mm(reserved: tuple[tuple[int, int], ...] = (), **kwargs: Any) -> HostMemory:
    return HostMemory(make_cpu(BANK0, BANK1), [BANK0, BANK1], reserved, **kwargs)


class FaultingWrites:
    """A CPU port whose stores to one page fault (the page is no longer the host's)."""

    def __init__(self, cpu: CpuPort, bad_page: int) -> None:
        self.cpu = cpu
        self.bad_page = bad_page

    def _bad(self, address: int, length: int) -> bool:
        return address < self.bad_page + PAGE_SIZE and self.bad_page < address + length

    def read(self, address: int, size: int) -> Any:
        return self.cpu.read(address, size)

    def write(self, address: int, size: int, value: int) -> Any:
        return object() if self._bad(address, size) else self.cpu.write(address, size, value)

    def read_bytes(self, address: int, length: int) -> Any:
        return self.cpu.read_bytes(address, length)

    def write_bytes(self, address: int, data: bytes) -> Any:
        return object() if self._bad(address, len(data)) else self.cpu.write_bytes(address, data)

    def now_us(self) -> float:
        return self.cpu.now_us()

    def udelay(self, us: float) -> None:
        self.cpu.udelay(us)

    def poll(self, condition: Any, timeout_us: float, step_us: float = 1.0) -> bool:
        return self.cpu.poll(condition, timeout_us, step_us)

    def poll_backoff(self, condition: Any, timeout_us: float, first_us: float, max_us: float) -> bool:
        return self.cpu.poll_backoff(condition, timeout_us, first_us, max_us)


# -- page ranges --------------------------------------------------------------------------------------


def test_page_ranges_coalesce_split_and_answer_queries() -> None:
    ranges = PageRanges([(10, 20), (30, 40)])
    ranges.add(20, 30)  # touching both: one run
    assert list(ranges) == [(10, 40)]
    ranges.remove(15, 18)
    assert list(ranges) == [(10, 15), (18, 40)] and ranges.total == 27
    assert ranges.covers(18, 40) and not ranges.covers(14, 19)
    assert ranges.overlaps(14, 16) and not ranges.overlaps(15, 18)
    assert list(ranges.intersection(12, 20)) == [(12, 15), (18, 20)]


# -- the allocator ------------------------------------------------------------------------------------


def test_first_fit_alignment_and_limits() -> None:
    mm = make_mm()
    assert mm.pages_total == 384 and mm.pages_in_use == 0
    assert mm.alloc_pages(1) == 0x4000_0000
    assert mm.alloc_pages(4, align=4) == 0x4000_4000  # pages 1-3 stay free for smaller requests
    assert mm.alloc_pages(3) == 0x4000_1000
    assert mm.pages_in_use == 8
    assert mm.alloc_pages(252) is None  # bank 0 has 248 left; bank 1 only 128
    assert mm.alloc_pages(200, limit=0x7FFF_FFFF) == 0x4000_8000
    assert mm.alloc_pages(100, limit=0x7FFF_FFFF) is None  # 48 pages left below; bank 1 is above
    assert mm.alloc_pages(100) == 0x8000_0000
    assert mm.alloc_pages(0) is None and mm.alloc_pages(1, align=0) is None


def test_reserved_ranges_are_never_handed_out() -> None:
    mm = make_mm(reserved=((0x4000_0000, 0x8_0000),))
    assert mm.pages_total == 256 and mm.alloc_pages(1) == 0x4008_0000
    assert mm.reserve(0x8000_0000, 0x1000) == 0 and mm.pages_total == 255
    assert mm.reserve(0x4008_0000, 0x1000) == -errno.EBUSY  # in use
    assert mm.reserve(0x4000_0000, 0x1000) == -errno.EINVAL  # not managed (already reserved)
    assert mm.alloc_pages(128) is None  # bank 1 lost a page
    assert mm.free_pages(0x8000_0000, 1) == -errno.EINVAL


def test_bad_frees_change_nothing() -> None:
    mm = make_mm()
    pa = mm.alloc_pages(4)
    assert pa is not None
    assert mm.free_pages(pa + 0x800, 1) == -errno.EINVAL  # not page aligned
    assert mm.free_pages(pa, 5) == -errno.EINVAL  # the fifth page is free already
    assert mm.free_pages(0x1000, 1) == -errno.EINVAL  # not RAM
    assert mm.pages_in_use == 4
    assert mm.free_pages(pa + PAGE_SIZE, 2) == 0  # part of an allocation may go back
    assert mm.pages_in_use == 2 and mm.free_pages(pa + PAGE_SIZE, 1) == -errno.EINVAL


@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3), st.integers(0, 1000)), max_size=50))
def test_random_alloc_free_never_overlaps_and_frees_coalesce(ops: list[tuple[int, int, int]]) -> None:
    mm = make_mm()
    live: dict[int, int] = {}
    for count, align_order, pick in ops:
        if pick % 3 == 0 and live:
            pa = sorted(live)[pick % len(live)]
            assert mm.free_pages(pa, live.pop(pa)) == 0
            continue
        align = 1 << align_order
        pa = mm.alloc_pages(count, align)
        if pa is None:
            continue
        assert (pa >> 12) % align == 0
        assert any(base <= pa and pa + count * PAGE_SIZE <= base + size for base, size in (BANK0, BANK1))
        assert all(
            pa + count * PAGE_SIZE <= other or other + n * PAGE_SIZE <= pa for other, n in live.items()
        )
        live[pa] = count
    assert mm.pages_in_use == sum(live.values())
    for pa, count in live.items():
        assert mm.free_pages(pa, count) == 0
    assert mm.free_runs() == [BANK0, BANK1]  # everything coalesced back into the two banks


# -- zeroing and faults ---------------------------------------------------------------------------


def test_zeroed_allocations_clear_reused_pages_only() -> None:
    trace = TraceBus()
    sink = trace.attach(RecordingSink())
    mm = HostMemory(make_cpu(BANK0), [BANK0], trace=trace)
    writes: list[int] = []
    real_write = mm.cpu.write_bytes

    def counting_write(address: int, data: bytes) -> Any:
        writes.append(len(data))
        return real_write(address, data)

    mm.cpu.write_bytes = counting_write  # type: ignore[method-assign]
    pa = mm.alloc_zeroed_pages(2)
    assert pa == 0x4000_0000 and writes == []  # fresh RAM reads as zero: no stores needed
    assert real_write(pa, b"\xff" * 2 * PAGE_SIZE) is None
    assert mm.free_pages(pa, 2) == 0
    again = mm.dma_alloc_coherent(3 * PAGE_SIZE)  # 3 pages, aligned to 4: pages 0-2 reused
    assert again == pa and writes == [2 * PAGE_SIZE]
    assert mm.cpu.read_bytes(pa, 3 * PAGE_SIZE) == bytes(3 * PAGE_SIZE)
    kinds = [e.kind for e in sink.select("host.mm")]
    assert kinds == ["alloc", "free", "alloc"]


def test_without_the_fresh_ram_hint_every_page_is_cleared() -> None:
    mm = make_mm(fresh_is_zero=False)
    assert mm.cpu.write_bytes(0x4000_0000, b"\x5a" * 16) is None  # firmware left data behind
    pa = mm.alloc_zeroed_pages(1)
    assert pa == 0x4000_0000 and mm.cpu.read_bytes(pa, 16) == bytes(16)


def test_a_faulting_clear_returns_no_memory_and_leaks_nothing() -> None:
    cpu = make_cpu(BANK0)
    mm = HostMemory(FaultingWrites(cpu, 0x4000_1000), [BANK0], fresh_is_zero=False)
    assert mm.alloc_zeroed_pages(4) is None
    assert mm.pages_in_use == 0
    assert mm.alloc_zeroed_pages(1) == 0x4000_0000  # a page the fault does not touch


# -- page-table adapters ------------------------------------------------------------------------------


def test_page_table_over_the_host_port_and_allocator() -> None:
    mm = make_mm()
    allocator = HostPageAllocator(mm)
    config = PageTableConfig(1, GRANULES[PAGE_SIZE], ias=48, oas=48)
    table = IoPageTable(config, HostTableMemory(mm.cpu), allocator)
    assert table.map(0x10_0000, 0x8000_0000, 2 * PAGE_SIZE, Prot.READ | Prot.WRITE).error == 0
    assert table.iova_to_phys(0x10_1234) == 0x8000_1234
    assert mm.pages_in_use == table.pages_allocated == 4
    table.free_all()
    assert mm.pages_in_use == 0
    assert allocator.alloc_pages(3) is None  # not a power of two
    assert allocator.alloc_pages(4) == 0x4000_0000 and allocator.granule_size == PAGE_SIZE


def test_host_table_memory_faults_raise_a_table_memory_abort() -> None:
    cpu = make_cpu(BANK0)
    memory = HostTableMemory(FaultingWrites(cpu, 0x4000_0000))
    with pytest.raises(TableMemoryAbort) as info:
        memory.write_u64(0x4000_0008, 1)
    assert isinstance(info.value, HostMemoryFault) and info.value.address == 0x4000_0008
    memory.write_u64(0x4000_1000, 0x1234)
    assert memory.read_u64(0x4000_1000) == 0x1234
    with pytest.raises(HostMemoryFault):
        memory.read_u64(0x1000)  # nothing there: the port reports an external abort
    with pytest.raises(HostMemoryFault):
        memory.zero_page(0x4000_0000)
