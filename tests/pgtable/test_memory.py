"""BusTableMemory (direct and observed paths) and RangePageAllocator."""

from __future__ import annotations

import pytest

from pkvm_smmu.arch.vmsa import GRANULE_4K, GRANULE_64K
from pkvm_smmu.machine.bus import HYP_CPU, Access, SystemBus
from pkvm_smmu.pgtable import (
    BusTableMemory,
    IoPageTable,
    PageTableConfig,
    Prot,
    RangePageAllocator,
    TableMemoryAbort,
)

BASE = 0x8000_0000


def bus_and_memory(size: int = 1 << 20) -> tuple[SystemBus, BusTableMemory]:
    bus = SystemBus()
    bus.add_ram(BASE, size)
    return bus, BusTableMemory(bus, HYP_CPU)


@pytest.mark.parametrize("observed", [False, True])
def test_accesses_round_trip(observed: bool) -> None:
    bus, memory = bus_and_memory()
    seen: list[Access] = []
    if observed:
        bus.observers.append(seen.append)
    memory.write_u64(BASE + 8, 0x1122_3344_5566_7788)
    assert bus.ram.read(BASE + 8, 8) == bytes.fromhex("8877665544332211")  # little-endian
    assert memory.read_u64(BASE + 8) == 0x1122_3344_5566_7788
    data = bytes(range(256)) * 40  # 10 KiB: spans three RAM pages
    memory.write_table(BASE + 0x800, data)
    assert memory.read_table(BASE + 0x800, len(data)) == data
    memory.zero_page(BASE + 0x1000, 0x2000)
    assert memory.read_table(BASE + 0x1000, 0x2000) == bytes(0x2000)
    assert memory.read_table(BASE + 0x800, 0x800) == data[:0x800]
    if observed:
        kinds = [(a.is_write, a.size, a.initiator) for a in seen]
        assert kinds == [
            (True, 8, HYP_CPU),
            (False, 8, HYP_CPU),
            (True, len(data), HYP_CPU),
            (False, len(data), HYP_CPU),
            (True, 0x2000, HYP_CPU),
            (False, 0x2000, HYP_CPU),
            (False, 0x800, HYP_CPU),
        ]
        assert seen[2].value == data


def test_accesses_outside_ram_abort() -> None:
    _, memory = bus_and_memory()
    with pytest.raises(TableMemoryAbort):
        memory.write_u64(0x1000, 1)
    with pytest.raises(TableMemoryAbort):
        memory.read_u64(0x1000)
    with pytest.raises(TableMemoryAbort):
        memory.write_table(BASE + (1 << 20) - 8, bytes(16))  # runs off the end of RAM


def test_observed_and_direct_paths_build_the_same_table() -> None:
    images = []
    for observed in (False, True):
        bus, memory = bus_and_memory(1 << 22)
        writes: list[Access] = []
        if observed:
            bus.observers.append(lambda a, w=writes: w.append(a) if a.is_write else None)
        allocator = RangePageAllocator(BASE, 1 << 22, 64 << 10, memory=memory)
        table = IoPageTable(PageTableConfig(2, GRANULE_64K, 48, 48), memory, allocator)
        assert table.map(0x1234_0000, 0x20_0000_0000, 0x40_0000, Prot.READ) == (0x40_0000, 0)
        images.append(bus.ram.read(BASE, 1 << 22))
        if observed:
            assert writes and all(a.address >= BASE for a in writes)
    assert images[0] == images[1]


def test_allocator_hands_out_zeroed_aligned_pages() -> None:
    bus, memory = bus_and_memory()
    allocator = RangePageAllocator(BASE, 4 * 4096, memory=memory)
    pages = [allocator.alloc_page() for _ in range(4)]
    assert sorted(pages) == [BASE + i * 4096 for i in range(4)]
    assert allocator.alloc_page() is None
    assert (allocator.pages_in_use, allocator.peak_pages, allocator.pages_free) == (4, 4, 0)
    bus.ram.write(pages[1], b"\xff" * 4096)
    allocator.free_page(pages[1])
    assert allocator.pages_in_use == 3 and allocator.peak_pages == 4
    assert allocator.alloc_page() == pages[1]
    assert bus.ram.read(pages[1], 4096) == bytes(4096)
    with pytest.raises(ValueError):
        allocator.free_page(BASE + 123)
    allocator.free_page(pages[0])
    with pytest.raises(ValueError):
        allocator.free_page(pages[0])


def test_allocator_contiguous_pages() -> None:
    _, memory = bus_and_memory()
    allocator = RangePageAllocator(BASE, 8 * 4096, memory=memory)
    first = allocator.alloc_page()
    pair = allocator.alloc_pages(2)
    assert first == BASE and pair == BASE + 2 * 4096  # aligned to 8 KiB; BASE + 4K stays free
    assert allocator.pages_in_use == 3
    assert allocator.alloc_pages(4) == BASE + 4 * 4096
    assert allocator.alloc_pages(2) is None
    assert allocator.alloc_page() == BASE + 4096
    allocator.free_pages(pair, 2)
    assert allocator.pages_in_use == 6
    with pytest.raises(ValueError):
        allocator.alloc_pages(3)


def test_table_rejects_allocator_of_other_page_size() -> None:
    _, memory = bus_and_memory()
    allocator = RangePageAllocator(BASE, 1 << 20, 4096, memory=memory)
    with pytest.raises(ValueError):
        IoPageTable(PageTableConfig(2, GRANULE_64K, 48, 48), memory, allocator)
    IoPageTable(PageTableConfig(2, GRANULE_4K, 48, 48), memory, allocator)


def test_table_pages_must_fit_in_a_descriptor() -> None:
    bus = SystemBus()
    bus.add_ram(1 << 48, 1 << 16)
    memory = BusTableMemory(bus, HYP_CPU)
    allocator = RangePageAllocator(1 << 48, 1 << 16, memory=memory)
    with pytest.raises(ValueError):
        IoPageTable(PageTableConfig(2, GRANULE_4K, 48, 48), memory, allocator)
