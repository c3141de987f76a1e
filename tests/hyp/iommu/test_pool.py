"""The IOMMU pool (v4 patch 11): zeroed pages from the IOMMU's HypPool, blocks aligned to their
size, exhaustion an error result (and a trace event), every allocation counted."""

from __future__ import annotations

import pytest

from pkvm_smmu.hyp.iommu import IommuPool
from pkvm_smmu.hyp.pool import HypPool
from pkvm_smmu.machine.bus import HYP_CPU, SystemBus
from pkvm_smmu.pgtable.memory import BusTableMemory
from pkvm_smmu.trace import Counters, RecordingSink, TraceBus

BASE_PFN = 0x80001  # deliberately not aligned to anything above a page


def make_pool(pages: int = 64) -> tuple[IommuPool, HypPool, SystemBus, RecordingSink]:
    bus = SystemBus()
    bus.add_ram(0x8000_0000, 1 << 24)
    trace = TraceBus()
    sink = trace.attach(RecordingSink())
    source = HypPool(BASE_PFN, pages, ram=bus.ram, name="iommu")
    return IommuPool(source, BusTableMemory(bus, HYP_CPU), trace), source, bus, sink


def test_pages_are_zeroed_and_counted() -> None:
    pool, source, bus, sink = make_pool()
    pa = pool.alloc_page()
    assert pa is not None and source.contains(pa)
    bus.ram.write(pa, b"\xff" * 4096)
    pool.free_page(pa)
    again = pool.alloc_page()
    assert again == pa and bus.ram.read(pa, 4096) == bytes(4096)
    assert pool.pages_in_use == 1
    kinds = [e.kind for e in sink.events if e.component == "hyp.iommu"]
    assert kinds == ["pool.alloc", "pool.free", "pool.alloc"]
    assert sink.events[-1].fields["in_use"] == 1


@pytest.mark.parametrize("count", [2, 4, 16])
def test_blocks_are_aligned_to_their_size(count: int) -> None:
    pool, source, _, _ = make_pool(pages=256)
    for _ in range(3):
        pa = pool.alloc_pages(count)
        assert pa is not None and pa % (count * 4096) == 0
    assert source.used_pages == pool.pages_in_use == 3 * count  # the trimmed pages went back


def test_exhaustion_is_a_result_not_a_crash() -> None:
    pool, _, _, _ = make_pool(pages=8)
    counters = Counters()
    pool.trace.attach(counters)
    taken = [pool.alloc_page() for _ in range(8)]
    assert None not in taken
    assert pool.alloc_page() is None and pool.alloc_pages(4) is None
    assert counters.get("hyp.iommu", "pool.exhausted") == 2
    assert pool.peak_pages == 8
    for pa in taken:
        assert pa is not None
        pool.free_page(pa)
    assert pool.pages_in_use == 0 and pool.alloc_pages(4) is not None


def test_without_a_source_nothing_is_allocated() -> None:
    bus = SystemBus()
    pool = IommuPool(None, BusTableMemory(bus, HYP_CPU), TraceBus())
    assert pool.alloc_page() is None


def test_freeing_what_the_pool_did_not_hand_out_is_a_bug() -> None:
    pool, _, _, _ = make_pool()
    pa = pool.alloc_pages(2)
    assert pa is not None
    with pytest.raises(ValueError):
        pool.free_pages(pa, 1)
    with pytest.raises(ValueError):
        pool.free_page(0x9000_0000)
    with pytest.raises(ValueError):
        pool.alloc_pages(3)
