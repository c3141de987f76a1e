"""Domains: iommu_map/iommu_unmap page-size splitting, unwinding and invalidation; attach, replace,
detach; DMA ownership; reserved regions; driver faults."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st
from iommu_rig import PGSIZES, SZ_1G, SZ_2M, SZ_4K, PagingDomain, Rig

from pkvm_smmu.host.driver_core import PlatformDevice
from pkvm_smmu.host.iommu import DomainType, IommuCore, IommuResvRegion, ResvType
from pkvm_smmu.host.mm import HostTableMemory
from pkvm_smmu.pgtable import Prot

RW = Prot.READ | Prot.WRITE


def probed(rig: Rig, name: str = "dma0", sid: int = 1) -> PlatformDevice:
    if not rig.core.iommus:
        rig.register_iommu(rig.ops())
    dev = rig.platform_device(name, sids=[sid])
    assert dev.iommu_group is not None
    return dev


def paging(rig: Rig, dev: PlatformDevice) -> PagingDomain:
    domain = rig.core.iommu_paging_domain_alloc(dev)
    assert isinstance(domain, PagingDomain) and domain.type is DomainType.UNMANAGED
    return domain


# -- iommu_map / iommu_unmap ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iova", "paddr", "size", "calls"),
    [
        # 2M-aligned 4M+8K: two 2M blocks, then two 4K pages
        (0x4020_0000, 0x8020_0000, 4 * SZ_2M // 2 + 2 * SZ_4K, [(SZ_2M, 2), (SZ_4K, 2)]),
        # 1G-aligned 1G+2M+4K
        (SZ_1G, 2 * SZ_1G, SZ_1G + SZ_2M + SZ_4K, [(SZ_1G, 1), (SZ_2M, 1), (SZ_4K, 1)]),
        # pages up to a 2M boundary, then a block
        (SZ_2M - SZ_4K, 3 * SZ_2M - SZ_4K, SZ_2M + SZ_4K, [(SZ_4K, 1), (SZ_2M, 1)]),
        # iova and paddr differently offset within 2M: never a block, one run of pages
        (SZ_2M, SZ_2M + SZ_4K, 2 * SZ_2M, [(SZ_4K, 1024)]),
    ],
)
def test_iommu_map_splits_by_pgsize_bitmap(
    rig: Rig, iova: int, paddr: int, size: int, calls: list[tuple[int, int]]
) -> None:
    domain = paging(rig, probed(rig))
    assert rig.core.iommu_map(domain, iova, paddr, size, RW) == 0
    assert [(pgsize, count) for _, _, pgsize, count in domain.map_calls] == calls
    offset = 0
    for call_iova, call_paddr, pgsize, count in domain.map_calls:
        assert (call_iova, call_paddr) == (iova + offset, paddr + offset)
        offset += pgsize * count
    assert offset == size
    for probe in (0, size // 2, size - 1):
        assert rig.core.iommu_iova_to_phys(domain, iova + probe) == paddr + probe


@given(
    iova_pages=st.integers(0, 1 << 20),
    paddr_pages=st.integers(0, 1 << 20),
    size_pages=st.integers(1, 1 << 19),
)
def test_iommu_pgsize_picks_the_largest_size_alignment_and_length_allow(
    iova_pages: int, paddr_pages: int, size_pages: int
) -> None:
    iova, paddr, remaining = iova_pages * SZ_4K, paddr_pages * SZ_4K, size_pages * SZ_4K
    while remaining:
        pgsize, count = IommuCore.iommu_pgsize(PGSIZES, iova, paddr, remaining)
        assert pgsize & PGSIZES and count >= 1 and pgsize * count <= remaining
        assert not (iova | paddr) & (pgsize - 1)
        larger = [s for s in (SZ_2M, SZ_1G) if s > pgsize]
        assert all((iova | paddr) & (s - 1) or s > remaining for s in larger)
        iova, paddr, remaining = iova + pgsize * count, paddr + pgsize * count, remaining - pgsize * count


def test_iommu_map_unwinds_what_it_mapped_when_a_run_fails(rig: Rig) -> None:
    domain = paging(rig, probed(rig))
    domain.fail_map_call = 1  # the 4K run fails after mapping half of it
    iova, paddr = 0x4020_0000, 0x8020_0000
    assert rig.core.iommu_map(domain, iova, paddr, 2 * SZ_2M + 2 * SZ_4K, RW) == -errno.ENOMEM
    for probe in (iova, iova + SZ_2M, iova + 2 * SZ_2M):
        assert rig.core.iommu_iova_to_phys(domain, probe) == 0
    assert domain.syncs == [(iova, iova + 2 * SZ_2M + SZ_4K)]  # what was mapped, invalidated


def test_iommu_map_refuses_misalignment_non_paging_domains_and_the_aperture(rig: Rig) -> None:
    dev = probed(rig)
    domain = paging(rig, dev)
    core = rig.core
    assert core.iommu_map(domain, 0x1000, 0x2800, 0x1000, RW) == -errno.EINVAL
    assert core.iommu_map(domain, 0x1000, 0x2000, 0x800, RW) == -errno.EINVAL
    assert core.iommu_map(domain, (1 << 48) - SZ_4K, 0, 2 * SZ_4K, RW) == -errno.EINVAL
    identity = rig.core.dev_iommu_ops(dev).identity_domain
    assert core.iommu_map(identity, 0, 0, SZ_4K, RW) == -errno.EINVAL
    assert domain.map_calls == []
    assert [e.fields["result"] for e in rig.events("map")] == [-errno.EINVAL] * 4


def test_iommu_unmap_invalidates_exactly_the_range_it_unmapped(rig: Rig) -> None:
    domain = paging(rig, probed(rig))
    iova = 0x10_0000
    assert rig.core.iommu_map(domain, iova, 0x4000_0000, 8 * SZ_4K, RW) == 0
    assert rig.core.iommu_unmap(domain, iova + SZ_4K, 3 * SZ_4K) == 3 * SZ_4K
    assert domain.syncs == [(iova + SZ_4K, iova + 4 * SZ_4K)]
    assert rig.core.iommu_iova_to_phys(domain, iova) == 0x4000_0000
    assert rig.core.iommu_iova_to_phys(domain, iova + SZ_4K) == 0
    assert rig.core.iommu_iova_to_phys(domain, iova + 4 * SZ_4K) == 0x4000_4000
    # a hole unmaps nothing; the sync still runs with an empty gather
    assert rig.core.iommu_unmap(domain, iova + SZ_4K, SZ_4K) == 0
    assert domain.syncs[-1] == (None, None)


def test_identity_domain_translates_one_to_one(rig: Rig) -> None:
    dev = probed(rig)
    identity = rig.core.dev_iommu_ops(dev).identity_domain
    blocked = rig.core.dev_iommu_ops(dev).blocked_domain
    assert rig.core.iommu_iova_to_phys(identity, 0x1234_5000) == 0x1234_5000
    assert rig.core.iommu_iova_to_phys(blocked, 0x1234_5000) == 0


def test_a_faulting_page_table_access_becomes_efault(rig: Rig) -> None:
    class FaultingCpu:
        def write(self, address: int, size: int, value: int) -> object:
            return ("fault", address)

        def read(self, address: int, size: int) -> object:
            return ("fault", address)

        def read_bytes(self, address: int, length: int) -> object:
            return ("fault", address)

        def write_bytes(self, address: int, data: bytes) -> object:
            return ("fault", address)

    domain = paging(rig, probed(rig))
    domain.table.memory = HostTableMemory(FaultingCpu())  # type: ignore[arg-type]
    assert rig.core.iommu_map(domain, 0, 0x4000_0000, SZ_4K, RW) == -errno.EFAULT
    assert rig.events("fault")[-1].fields["op"] == "map_pages"


# -- attach / replace / detach ---------------------------------------------------------------------


def test_attach_replace_detach(rig: Rig) -> None:
    dev = probed(rig)
    group = dev.iommu_group
    default = group.default_domain
    d1, d2 = paging(rig, dev), paging(rig, dev)
    core = rig.core

    assert core.iommu_attach_device(d1, dev) == 0
    assert group.domain is d1 and d1.devices == [dev] and default.devices == []
    assert core.iommu_attach_device(d2, dev) == -errno.EBUSY  # a user domain is attached
    assert core.iommu_group_replace_domain(group, d2) == 0
    assert group.domain is d2 and d1.devices == [] and d2.devices == [dev]
    assert core.iommu_detach_device(d1, dev) == -errno.EINVAL  # not the attached domain
    assert core.iommu_detach_device(d2, dev) == 0
    assert group.domain is default and default.devices == [dev]

    attached = [domain for name, domain in core.dev_iommu_ops(dev).log if name == "dma0"]
    # default, d1, d2, default: replace never went through a blocked domain
    assert attached == [f"paging:{id(d):x}" for d in (default, d1, d2, default)]
    assert [e.fields["domain"].split("#")[0] for e in rig.events("attach")] == [
        "dma",
        "unmanaged",
        "unmanaged",
        "dma",
    ]


def test_failed_group_attach_rolls_every_device_back(rig: Rig) -> None:
    rig.register_iommu(rig.ops())
    fn0 = rig.pci_device(0x10, sid=0x10)
    fn1 = rig.pci_device(0x11, sid=0x11, aliases=(0x10,))
    group = fn0.iommu_group
    default = group.default_domain
    domain = paging(rig, fn0)
    domain.fail_attach.add(fn1.name)
    assert rig.core.iommu_attach_device(domain, fn0) == -errno.EINVAL  # shared group: attach the group
    assert rig.core.iommu_attach_group(domain, group) == -errno.EIO
    assert group.domain is default and set(default.devices) == {fn0, fn1} and domain.devices == []
    log = [entry for entry in rig.core.dev_iommu_ops(fn0).log if entry[0] == fn0.name]
    assert log[-2:] == [(fn0.name, f"paging:{id(domain):x}"), (fn0.name, f"paging:{id(default):x}")]


def test_domain_of_another_iommu_is_refused(rig: Rig) -> None:
    dev = probed(rig)
    other = rig.ops()
    foreign = other.domain_alloc_paging(dev)
    foreign.owner = other  # type: ignore[union-attr]
    assert rig.core.iommu_attach_device(foreign, dev) == -errno.EINVAL  # type: ignore[arg-type]


def test_domain_free_releases_tables_and_leaves_static_domains_alone(rig: Rig) -> None:
    dev = probed(rig)
    in_use = rig.mm.pages_in_use
    domain = paging(rig, dev)
    assert rig.mm.pages_in_use > in_use
    rig.core.iommu_domain_free(domain)
    assert domain.freed and rig.mm.pages_in_use == in_use
    identity = rig.core.dev_iommu_ops(dev).identity_domain
    rig.core.iommu_domain_free(identity)
    assert rig.core.dev_iommu_ops(dev).identity_domain is identity


def test_dma_ownership_blocks_kernel_drivers_until_released(rig: Rig) -> None:
    dev = probed(rig)
    group = dev.iommu_group
    ops = rig.core.dev_iommu_ops(dev)
    assert rig.core.iommu_group_claim_dma_owner(group, "vfio") == 0
    assert group.domain is ops.blocked_domain
    assert rig.core.iommu_group_claim_dma_owner(group, "other") == -errno.EPERM
    user = paging(rig, dev)
    assert rig.core.iommu_attach_group(user, group) == 0
    drv = rig.driver()
    assert drv.bound == []  # the kernel may not use the DMA API of a user-owned group
    assert rig.core.iommu_detach_group(user, group) == 0
    assert group.domain is ops.blocked_domain  # owned: back to blocked, not to the default
    rig.core.iommu_group_release_dma_owner(group)
    assert group.domain is group.default_domain
    rig.kernel.device_attach(dev)
    assert drv.bound == ["dma0"] and group.owner_cnt == 1
    rig.kernel.device_release_driver(dev)
    assert group.owner_cnt == 0


def test_direct_regions_are_mapped_one_to_one_and_never_blocked(rig: Rig) -> None:
    ops = rig.ops()
    rmr = IommuResvRegion(0x8000_0000, 3 * SZ_4K, RW, ResvType.DIRECT)
    ops.resv["fb"] = [rmr]
    rig.register_iommu(ops)
    dev = rig.platform_device("fb", sids=[7])
    default = dev.iommu_group.default_domain
    for offset in range(0, rmr.length, SZ_4K):
        assert rig.core.iommu_iova_to_phys(default, rmr.start + offset) == rmr.start + offset
    assert rig.core.iommu_group_claim_dma_owner(dev.iommu_group, "vfio") == -errno.EINVAL
    assert dev.iommu_group.domain is default
    # Replacing with a paging domain is allowed: the user is expected to keep the RMR mapped.
    scanout = paging(rig, dev)
    assert rig.core.iommu_group_replace_domain(dev.iommu_group, scanout) == 0
