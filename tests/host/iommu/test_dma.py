"""The DMA API: dma-direct, strict and lazy (flush queue) IOMMU mappings, scatterlists, coherent
buffers, IOVA placement, blocked devices."""

from __future__ import annotations

import pytest
from iommu_rig import SZ_4K, PagingDomain, Rig, build_rig

from pkvm_smmu.host.driver_core import PlatformDevice
from pkvm_smmu.host.iommu import (
    DMA_MAPPING_ERROR,
    DmaDirection,
    DomainType,
    IommuPolicy,
    IommuResvRegion,
    ResvType,
    ScatterEntry,
    dma_alloc_coherent,
    dma_bit_mask,
    dma_free_coherent,
    dma_map_sg,
    dma_map_single,
    dma_set_mask,
    dma_set_mask_and_coherent,
    dma_unmap_sg,
    dma_unmap_single,
)
from pkvm_smmu.pgtable import Prot

TO_DEV = DmaDirection.TO_DEVICE
FROM_DEV = DmaDirection.FROM_DEVICE
BIDI = DmaDirection.BIDIRECTIONAL
TOP_32 = 1 << 32


def device(rig: Rig, name: str = "dma0", **ops_args: object) -> PlatformDevice:
    if not rig.core.iommus:
        rig.register_iommu(rig.ops(**ops_args))  # type: ignore[arg-type]
    return rig.platform_device(name, sids=[len(rig.core.groups) + 1])


def domain_of(dev: PlatformDevice) -> PagingDomain:
    domain = dev.iommu_group.default_domain
    assert isinstance(domain, PagingDomain)
    return domain


# -- strict ---------------------------------------------------------------------------------------


def test_strict_map_unmap_allocates_top_down_keeps_the_offset_and_syncs(rig: Rig) -> None:
    dev = device(rig)
    domain = domain_of(dev)
    core = rig.core
    dma = dma_map_single(dev, 0x4000_1234, 0x2000, TO_DEV)
    # 0x2234 bytes from offset 0x234 span 3 pages, rounded to 4 and aligned to 4, below 4 GiB
    assert dma == TOP_32 - 4 * SZ_4K + 0x234
    assert domain.map_calls == [(TOP_32 - 4 * SZ_4K, 0x4000_1000, SZ_4K, 3)]
    assert core.iommu_iova_to_phys(domain, dma) == 0x4000_1234
    assert core.iommu_iova_to_phys(domain, dma + 0x1FFF) == 0x4000_3233

    dma_unmap_single(dev, dma, 0x2000, TO_DEV)
    assert domain.syncs == [(TOP_32 - 4 * SZ_4K, TOP_32 - SZ_4K)]
    assert core.iommu_iova_to_phys(domain, dma) == 0
    # strict: the IOVA is free again at once
    assert dma_map_single(dev, 0x4000_1234, 0x2000, TO_DEV) == dma
    maps = [e for e in rig.events("dma.map") if e.fields["dev"] == "dma0"]
    assert [e.fields["mode"] for e in maps] == ["dma", "dma"]


def test_direction_sets_the_mapping_permissions(rig: Rig) -> None:
    dev = device(rig)
    domain = domain_of(dev)
    to_dev = dma_map_single(dev, 0x4000_0000, SZ_4K, TO_DEV)
    from_dev = dma_map_single(dev, 0x4000_1000, SZ_4K, FROM_DEV)
    leaves = {leaf.iova: leaf.desc for leaf in domain.table.walk_leaves()}
    ap_read_only = 1 << 7  # stage-1 AP[2]
    assert leaves[to_dev] & ap_read_only and not leaves[from_dev] & ap_read_only
    assert dma_map_single(dev, 0x4000_0000, SZ_4K, DmaDirection.NONE) == DMA_MAPPING_ERROR


def test_iova_stays_below_the_dma_mask_and_runs_out(rig: Rig) -> None:
    dev = device(rig)
    assert dma_set_mask(dev, 0x7FFF) == 0  # pfns 1..7: IOVA 0 is never handed out
    got = [dma_map_single(dev, 0x4000_0000, 2 * SZ_4K, BIDI) for _ in range(4)]
    assert got == [0x6000, 0x4000, 0x2000, DMA_MAPPING_ERROR]
    assert rig.events("dma.iova_exhausted")
    assert dma_map_single(dev, 0x4000_0000, SZ_4K, BIDI) == 0x1000  # a single page still fits


def test_pci_devices_get_32_bit_iovas_first_unless_forcedac() -> None:
    for forcedac, expect_below_4g in ((False, True), (True, False)):
        rig = build_rig(IommuPolicy(forcedac=forcedac))
        rig.register_iommu(rig.ops())
        pdev = rig.pci_device(0x08, sid=8)
        assert dma_set_mask_and_coherent(pdev, dma_bit_mask(64)) == 0
        dma = dma_map_single(pdev, 0x4000_0000, SZ_4K, BIDI)
        assert (dma < TOP_32) is expect_below_4g
        assert dma == (TOP_32 if expect_below_4g else 1 << 48) - SZ_4K  # the domain's aperture


# -- lazy ------------------------------------------------------------------------------------------


def lazy_rig(fq_size: int = 256) -> Rig:
    return build_rig(IommuPolicy(default_domain_type=DomainType.DMA_FQ, fq_size=fq_size))


def test_lazy_unmap_clears_ptes_but_defers_invalidation_and_iova_reuse() -> None:
    rig = lazy_rig()
    dev = device(rig)
    domain = domain_of(dev)
    assert domain.type is DomainType.DMA_FQ
    a = dma_map_single(dev, 0x4000_0000, SZ_4K, BIDI)
    dma_unmap_single(dev, a, SZ_4K, BIDI)
    assert rig.core.iommu_iova_to_phys(domain, a) == 0  # the PTE is gone at once
    assert domain.syncs == [] and domain.flushes == 0  # ...but nothing was invalidated
    b = dma_map_single(dev, 0x4000_1000, SZ_4K, BIDI)
    assert b != a  # the IOVA a stale IOTLB entry may still translate is not reused

    rig.advance_us(9_999)
    c = dma_map_single(dev, 0x4000_2000, SZ_4K, BIDI)
    assert domain.flushes == 0 and c not in (a, b)
    rig.advance_us(2)  # 10 ms after the first queued unmap
    d = dma_map_single(dev, 0x4000_3000, SZ_4K, BIDI)  # any DMA API call notices the timer
    assert domain.flushes == 1 and d == a
    assert [e.fields["reason"] for e in rig.events("dma.fq_flush")] == ["timer"]


def test_flush_queue_timer_fires_from_the_kernel_timer_without_dma_activity() -> None:
    rig = lazy_rig()
    dev = device(rig)
    domain = domain_of(dev)
    a = dma_map_single(dev, 0x4000_0000, SZ_4K, BIDI)
    dma_unmap_single(dev, a, SZ_4K, BIDI)
    rig.advance_us(10_000)
    rig.kernel.run_timers()
    assert domain.flushes == 1 and domain.iova_cookie.fq == type(domain.iova_cookie.fq)()
    assert dma_map_single(dev, 0x4000_0000, SZ_4K, BIDI) == a


def test_full_flush_queue_flushes_before_queueing_more() -> None:
    rig = lazy_rig(fq_size=4)
    dev = device(rig)
    domain = domain_of(dev)
    addrs = [dma_map_single(dev, 0x4000_0000 + i * SZ_4K, SZ_4K, BIDI) for i in range(4)]
    for addr in addrs[:3]:
        dma_unmap_single(dev, addr, SZ_4K, BIDI)
    assert domain.flushes == 0 and len(domain.iova_cookie.fq) == 3  # a 4-slot ring holds 3
    dma_unmap_single(dev, addrs[3], SZ_4K, BIDI)
    assert domain.flushes == 1 and [e.fields["reason"] for e in rig.events("dma.fq_flush")] == ["full"]
    assert len(domain.iova_cookie.fq) == 1  # the fourth waits for the next flush
    again = [dma_map_single(dev, 0x5000_0000, SZ_4K, BIDI) for _ in range(3)]
    assert sorted(again) == sorted(addrs[:3]) and addrs[3] not in again


def test_lazy_flush_releases_freed_table_pages_only_after_the_flush() -> None:
    rig = lazy_rig()
    dev = device(rig)
    domain = domain_of(dev)
    a = dma_map_single(dev, 0x4000_0000, SZ_4K, BIDI)
    cookie = domain.iova_cookie
    dma_unmap_single(dev, a, SZ_4K, BIDI)
    entry = cookie.fq[0]
    entry.gather.add_freed_table(0x4123_4000)  # pretend the unmap freed a table page
    released: list[int] = []
    domain.free_gathered_tables = lambda gather: released.extend(gather.freed_tables)  # type: ignore[method-assign]
    assert released == []
    cookie.flush("test")
    assert released == [0x4123_4000]


# -- scatterlists ----------------------------------------------------------------------------------


def test_map_sg_uses_one_contiguous_iova_range_and_merges_segments(rig: Rig) -> None:
    dev = device(rig)
    domain = domain_of(dev)
    sg = [
        ScatterEntry(0x4000_5000, SZ_4K),
        ScatterEntry(0x4100_0000, SZ_4K),  # starts a granule: merges with the first
        ScatterEntry(0x4200_0100, 0x200),  # offset in its page: a new segment
        ScatterEntry(0x4300_0000, 0x100),  # the previous one ended mid-page: a new segment
    ]
    assert dma_map_sg(dev, sg, TO_DEV) == 3
    base = sg[0].dma_address
    assert sg[0].dma_length == 2 * SZ_4K
    assert (sg[1].dma_address, sg[1].dma_length) == (base + 2 * SZ_4K + 0x100, 0x200)
    assert (sg[2].dma_address, sg[2].dma_length) == (base + 3 * SZ_4K, 0x100)
    assert (sg[3].dma_address, sg[3].dma_length) == (DMA_MAPPING_ERROR, 0)
    phys = [rig.core.iommu_iova_to_phys(domain, a) for a in (base, base + SZ_4K, sg[1].dma_address)]
    assert phys == [0x4000_5000, 0x4100_0000, 0x4200_0100]
    dma_unmap_sg(dev, sg, TO_DEV)
    assert domain.syncs == [(base, base + 4 * SZ_4K)]
    assert rig.core.iommu_iova_to_phys(domain, base) == 0


def test_map_sg_respects_the_maximum_segment_size(rig: Rig) -> None:
    dev = device(rig)
    dev.dma_max_seg_size = 2 * SZ_4K  # type: ignore[attr-defined]
    sg = [ScatterEntry(0x4000_0000 + i * 0x10_0000, SZ_4K) for i in range(3)]
    assert dma_map_sg(dev, sg, BIDI) == 2
    assert [e.dma_length for e in sg] == [2 * SZ_4K, SZ_4K, 0]


def test_map_sg_failure_leaves_nothing_mapped(rig: Rig) -> None:
    dev = device(rig)
    domain = domain_of(dev)
    domain.fail_map_call = 1
    sg = [ScatterEntry(0x4000_0000, 2 * SZ_4K), ScatterEntry(0x4100_0000, 2 * SZ_4K)]
    assert dma_map_sg(dev, sg, BIDI) == 0
    assert list(domain.table.walk_leaves()) == []
    assert domain.iova_cookie.iovad.allocated == []


# -- coherent ----------------------------------------------------------------------------------------


def test_coherent_buffers_are_zeroed_mapped_and_freed(rig: Rig) -> None:
    dev = device(rig)
    domain = domain_of(dev)
    got = dma_alloc_coherent(dev, 6000)
    assert got is not None
    pa, dma = got
    in_use = rig.mm.pages_in_use  # the buffer's 2 pages, and the table pages mapping it
    assert pa % SZ_4K == 0 and rig.core.iommu_iova_to_phys(domain, dma + 5999) == pa + 5999
    assert rig.cpu.write_bytes(pa, b"\xa5" * 6000) is None
    dma_free_coherent(dev, 6000, pa, dma)
    assert rig.core.iommu_iova_to_phys(domain, dma) == 0 and rig.mm.pages_in_use == in_use - 2
    again = dma_alloc_coherent(dev, 6000)
    assert again is not None and again[0] == pa  # the same pages, cleared
    assert rig.cpu.read_bytes(pa, 6000) == bytes(6000)


# -- dma-direct and blocked ---------------------------------------------------------------------------


def test_dma_direct_checks_the_mask_and_allocates_below_the_coherent_mask(rig: Rig) -> None:
    dev = rig.platform_device("plain")  # no IOMMU
    rig.driver()
    high = 0x1_2000_0000
    assert dma_map_single(dev, high, SZ_4K, BIDI) == DMA_MAPPING_ERROR
    assert dma_set_mask_and_coherent(dev, dma_bit_mask(64)) == 0
    assert dma_map_single(dev, high, SZ_4K, BIDI) == high
    sg = [ScatterEntry(0x4000_0000, 100), ScatterEntry(high, 100)]
    assert dma_map_sg(dev, sg, BIDI) == 2 and sg[1].dma_address == high

    assert dma_set_mask_and_coherent(dev, dma_bit_mask(32)) == 0
    rig.mm.alloc_pages(rig.mm.pages_free - 16)  # only the top 64 KiB of RAM (above 4 GiB) is left
    assert dma_alloc_coherent(dev, SZ_4K) is None  # nothing free below the 32-bit mask
    assert dma_set_mask_and_coherent(dev, dma_bit_mask(64)) == 0
    got = dma_alloc_coherent(dev, SZ_4K)
    assert got is not None and got[0] == got[1] >= TOP_32


def test_blocked_default_domain_refuses_every_mapping(rig: Rig) -> None:
    ops = rig.ops()
    ops.default_domain = ops.blocked_domain  # type: ignore[attr-defined]
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[1])
    assert dev.iommu_group.domain is ops.blocked_domain
    assert dma_map_single(dev, 0x4000_0000, SZ_4K, BIDI) == DMA_MAPPING_ERROR
    assert dma_map_sg(dev, [ScatterEntry(0x4000_0000, SZ_4K)], BIDI) == 0
    assert dma_alloc_coherent(dev, SZ_4K) is None
    assert rig.events("dma.map")[-1].fields["mode"] == "blocked"


def test_reserved_regions_are_never_handed_out_but_the_sw_msi_window_is_ours(rig: Rig) -> None:
    ops = rig.ops()
    ops.resv["dma0"] = [
        IommuResvRegion(TOP_32 - 0x10_0000, 0x10_0000, Prot.NONE, ResvType.RESERVED),
        IommuResvRegion(0x800_0000, 0x10_0000, Prot.READ | Prot.WRITE, ResvType.SW_MSI),
    ]
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[1])
    assert dma_map_single(dev, 0x4000_0000, SZ_4K, BIDI) == TOP_32 - 0x10_0000 - SZ_4K
    reserved = dev.iommu_group.default_domain.iova_cookie.iovad.reserved
    assert [(r.pfn_lo << 12, (r.pfn_hi + 1) << 12) for r in reserved] == [(TOP_32 - 0x10_0000, TOP_32)]


@pytest.mark.parametrize("policy", ["iommu.passthrough=1", ""])
def test_dma_api_events_count_every_operation(policy: str) -> None:
    rig = build_rig(IommuPolicy.from_cmdline(policy))
    dev = device(rig)
    for i in range(3):
        dma = dma_map_single(dev, 0x4000_0000 + i * SZ_4K, SZ_4K, BIDI)
        dma_unmap_single(dev, dma, SZ_4K, BIDI)
    assert len(rig.events("dma.map")) == 3 and len(rig.events("dma.unmap")) == 3
    assert {e.fields["mode"] for e in rig.events("dma.map")} == {"direct" if policy else "dma"}
