"""pv-paging at the hyp: domains, attach/detach, map/unmap with DMA refcounts, the pool top-up, the
ordering unmap -> TLBI + SYNC -> unuse, and argument validation for every hypercall."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import pytest

from pkvm_smmu.arch.pv_iommu_abi import (
    HVC_ALLOC_DOMAIN,
    HVC_ATTACH_DEV,
    HVC_CAPS,
    HVC_DETACH_DEV,
    HVC_FREE_DOMAIN,
    HVC_IOVA_TO_PHYS,
    HVC_MAP_PAGES,
    HVC_TOPUP_POOL,
    HVC_UNMAP_PAGES,
    TOPUP_MAX_PAGES,
    Caps,
    CapsQuery,
    DomainType,
)
from pkvm_smmu.arch.strtab import STE, SteConfig
from pkvm_smmu.pgtable.prot import Prot

sys.path.insert(0, os.path.dirname(__file__))
from pv_rig import BUF, PAGE, RAM_BASE, RAM_SIZE, SMMU_BASE, TOPUP, PvRig, paging_rig

SID = 0x10
IOVA = 0x1000_0000
RW = int(Prot.READ | Prot.WRITE | Prot.CACHE)
U64 = (1 << 64) - 1


def topup(r: PvRig, pages: int = 64, at: int = TOPUP) -> None:
    assert r.hvc(HVC_TOPUP_POOL, at >> 12, pages) == 0


@pytest.fixture
def r() -> PvRig:
    rig = paging_rig()
    topup(rig)
    return rig


@pytest.fixture
def s1(r: PvRig) -> PvRig:
    """Domain 1 (stage 1) attached to SID."""
    assert r.hvc(HVC_ALLOC_DOMAIN, 1, DomainType.S1) == 0
    assert r.hvc(HVC_ATTACH_DEV, 1, 0, SID, 0) == 0
    return r


def refs(r: PvRig, pa: int) -> int:
    return r.pkvm.mem_protect.dma_refcount(pa >> 12)


def test_caps_say_paging(r: PvRig) -> None:
    assert r.hvc(HVC_CAPS, 0, CapsQuery.FLAGS) == Caps.IDENTITY | Caps.BLOCKING | Caps.PAGING
    assert r.hvc(HVC_CAPS, 0, CapsQuery.PGSIZE_BITMAP) & PAGE
    assert r.hvc(HVC_CAPS, 0, CapsQuery.IAS) == 48


def test_alloc_domain_needs_pool_memory_the_host_donates() -> None:
    r = paging_rig()
    assert r.hvc(HVC_ALLOC_DOMAIN, 1, DomainType.ANY) == -errno.ENOMEM
    topup(r, 4)
    assert r.pkvm.mem_protect.host_state(TOPUP >> 12).value == "nopage"
    assert r.hvc(HVC_ALLOC_DOMAIN, 1, DomainType.ANY) == 0
    assert r.pv.domains[1].stage == 1  # ANY is stage 1 where the SMMU has it
    assert r.hvc(HVC_ALLOC_DOMAIN, 2, DomainType.S2) == 0
    assert r.pv.domains[2].stage == 2


@pytest.mark.parametrize("stage", [DomainType.S1, DomainType.S2])
def test_map_dma_unmap(r: PvRig, stage: DomainType) -> None:
    assert r.hvc(HVC_ALLOC_DOMAIN, 3, stage) == 0
    assert r.hvc(HVC_ATTACH_DEV, 3, 0, SID, 0) == 0
    ste = r.hyp.read_ste(SID)
    assert ste is not None
    assert STE.CONFIG.get(ste) == (SteConfig.S1_TRANS if stage == DomainType.S1 else SteConfig.S2_TRANS)
    ep = r.endpoint(SID)
    assert r.host_write(BUF + 0x10, b"payload") is None
    assert not ep.read(IOVA + 0x10, 7).ok
    assert r.hvc(HVC_MAP_PAGES, 3, IOVA, BUF, PAGE, 2, RW) == 2 * PAGE
    assert r.hvc(HVC_IOVA_TO_PHYS, 3, IOVA + PAGE + 5) == BUF + PAGE + 5
    assert refs(r, BUF) == refs(r, BUF + PAGE) == 1
    result = ep.read(IOVA + 0x10, 7)
    assert result.ok and result.data == b"payload"
    assert r.hvc(HVC_UNMAP_PAGES, 3, IOVA, PAGE, 2) == 2 * PAGE
    assert refs(r, BUF) == 0
    assert not ep.read(IOVA + 0x10, 7).ok  # the TLB entry went with the unmap
    assert r.hvc(HVC_IOVA_TO_PHYS, 3, IOVA) == 0


def test_a_page_mapped_for_dma_cannot_be_donated_until_unmapped(s1: PvRig) -> None:
    r = s1
    mp = r.pkvm.mem_protect
    pfn = BUF >> 12
    assert r.hvc(HVC_MAP_PAGES, 1, IOVA, BUF, PAGE, 1, RW) == PAGE
    assert mp.host_donate_hyp(pfn, 1) == -errno.EBUSY
    assert mp.host_share_hyp(pfn) == -errno.EBUSY
    assert r.pkvm.hvc("__pkvm_host_share_hyp", pfn) == -errno.EBUSY
    assert r.hvc(HVC_MAP_PAGES, 1, IOVA + PAGE, BUF, PAGE, 1, RW) == PAGE  # a second mapping
    assert refs(r, BUF) == 2
    assert r.hvc(HVC_UNMAP_PAGES, 1, IOVA, PAGE, 1) == PAGE
    assert mp.host_donate_hyp(pfn, 1) == -errno.EBUSY
    assert r.hvc(HVC_UNMAP_PAGES, 1, IOVA + PAGE, PAGE, 1) == PAGE
    assert mp.host_donate_hyp(pfn, 1) == 0
    # Now the hyp's: the host may not map it any more.
    assert r.hvc(HVC_MAP_PAGES, 1, IOVA, BUF, PAGE, 1, RW) == -errno.EPERM


def test_donation_to_a_guest_is_refused_too(s1: PvRig) -> None:
    r = s1
    pgd = RAM_BASE + 0x0500_0000
    handle = r.pkvm.hvc("__pkvm_init_vm", pgd >> 12, 1)
    assert handle > 0
    assert r.hvc(HVC_MAP_PAGES, 1, IOVA, BUF, PAGE, 1, RW) == PAGE
    assert r.pkvm.hvc("__pkvm_host_donate_guest", BUF >> 12, 0x10, handle) == -errno.EBUSY
    assert r.hvc(HVC_UNMAP_PAGES, 1, IOVA, PAGE, 1) == PAGE
    assert r.pkvm.hvc("__pkvm_host_donate_guest", BUF >> 12, 0x10, handle) == 0


def test_pages_become_donatable_only_after_tlbi_and_sync(s1: PvRig, monkeypatch: Any) -> None:
    r = s1
    mp = r.pkvm.mem_protect
    assert r.hvc(HVC_MAP_PAGES, 1, IOVA, BUF, PAGE, 4, RW) == 4 * PAGE
    assert r.endpoint(SID).read(IOVA, 8).ok  # the TLB holds the translation
    seen: list[tuple[list[str], bool]] = []
    real = mp.host_unuse_dma

    def unuse(pfn: int, nr: int) -> int:
        consumed = [e.fields["opcode"] for e in r.events("smmu0", "cmd")]
        # The device can no longer reach the page at the moment its reference drops.
        seen.append((consumed, r.endpoint(SID).read(IOVA, 8).ok))
        return real(pfn, nr)

    monkeypatch.setattr(mp, "host_unuse_dma", unuse)
    before = len(r.events("smmu0", "cmd"))
    assert r.hvc(HVC_UNMAP_PAGES, 1, IOVA, PAGE, 4) == 4 * PAGE
    assert seen
    for consumed, reachable in seen:
        tail = consumed[before:]
        assert "TLBI_NH_VA" in tail and tail[-1] == "SYNC"
        assert not reachable
    assert refs(r, BUF) == 0


def test_pool_exhaustion_mid_map_returns_the_progress_made() -> None:
    r = paging_rig()
    topup(r, 4)  # the pgd and the CD, then two of the three table pages a first mapping needs
    assert r.hvc(HVC_ALLOC_DOMAIN, 1, DomainType.S1) == 0
    assert r.hvc(HVC_MAP_PAGES, 1, IOVA, BUF, PAGE, 1, RW) == -errno.ENOMEM
    assert refs(r, BUF) == 0
    topup(r, 1, TOPUP + 0x10_0000)  # enough for the first leaf table only
    start = IOVA + (2 << 20) - 2 * PAGE  # four pages across a 2 MiB boundary: two leaf tables
    assert r.hvc(HVC_MAP_PAGES, 1, start, BUF, PAGE, 4, RW) == 2 * PAGE
    assert refs(r, BUF) == refs(r, BUF + PAGE) == 1
    assert refs(r, BUF + 2 * PAGE) == refs(r, BUF + 3 * PAGE) == 0  # the rest was unused again
    topup(r, 1, TOPUP + 0x20_0000)
    assert r.hvc(HVC_MAP_PAGES, 1, start + 2 * PAGE, BUF + 2 * PAGE, PAGE, 2, RW) == 2 * PAGE
    assert r.hvc(HVC_IOVA_TO_PHYS, 1, start + 3 * PAGE) == BUF + 3 * PAGE


def test_mapping_over_a_mapping_is_refused(s1: PvRig) -> None:
    r = s1
    assert r.hvc(HVC_MAP_PAGES, 1, IOVA, BUF, PAGE, 1, RW) == PAGE
    assert r.hvc(HVC_MAP_PAGES, 1, IOVA, BUF + PAGE, PAGE, 1, RW) == -errno.EEXIST
    assert refs(r, BUF + PAGE) == 0


def test_free_domain(s1: PvRig) -> None:
    r = s1
    assert r.hvc(HVC_MAP_PAGES, 1, IOVA, BUF, PAGE, 1, RW) == PAGE
    assert r.hvc(HVC_FREE_DOMAIN, 1) == -errno.EBUSY  # still attached
    assert r.hvc(HVC_DETACH_DEV, 1, 0, SID, 0) == 0
    ste = r.hyp.read_ste(SID)
    assert ste is not None and STE.CONFIG.get(ste) == SteConfig.ABORT
    in_use = r.pv.host_pool.pages_in_use
    assert r.hvc(HVC_FREE_DOMAIN, 1) == 0
    assert r.pv.host_pool.pages_in_use < in_use
    assert refs(r, BUF) == 0  # what was still mapped was released
    assert r.hvc(HVC_FREE_DOMAIN, 1) == -errno.ENOENT


def test_attach_replaces_and_identity_domain(s1: PvRig) -> None:
    r = s1
    assert r.hvc(HVC_ALLOC_DOMAIN, 2, DomainType.S2) == 0
    assert r.hvc(HVC_ATTACH_DEV, 2, 0, SID, 0) == 0  # straight from domain 1 to domain 2
    assert r.pv.domains[1].endpoints == set() and r.pv.domains[2].endpoints == {(0, SID)}
    assert r.hvc(HVC_DETACH_DEV, 1, 0, SID, 0) == -errno.EINVAL  # not attached there any more
    assert r.hvc(HVC_ATTACH_DEV, 0, 0, SID, 0) == 0  # the identity domain
    assert r.host_write(BUF, b"id") is None
    result = r.endpoint(SID).read(BUF, 2)
    assert result.ok and result.data == b"id"
    assert r.hvc(HVC_MAP_PAGES, 0, IOVA, BUF, PAGE, 1, RW) == -errno.EINVAL
    assert r.hvc(HVC_FREE_DOMAIN, 0) == -errno.EINVAL
    assert r.hvc(HVC_DETACH_DEV, 0, 0, SID, 0) == 0
    assert not r.endpoint(SID).read(BUF, 2).ok


# -- argument validation, one table per hypercall ----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((2, DomainType.S2), 0),
        ((0, DomainType.S1), -errno.EINVAL),  # the identity domain's id
        ((256, DomainType.S1), -errno.EINVAL),  # beyond MAX_DOMAINS
        ((U64, DomainType.S1), -errno.EINVAL),
        ((2, 3), -errno.EINVAL),  # unknown type
        ((2, U64), -errno.EINVAL),
        ((1, DomainType.S1), -errno.EEXIST),
        ((2,), -errno.EINVAL),
    ],
)
def test_alloc_domain_arguments(s1: PvRig, args: tuple[int, ...], expected: int) -> None:
    assert s1.hvc(HVC_ALLOC_DOMAIN, *(int(a) for a in args)) == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((7,), -errno.ENOENT),
        ((U64,), -errno.ENOENT),
        ((0,), -errno.EINVAL),
        ((1,), -errno.EBUSY),
    ],
)
def test_free_domain_arguments(s1: PvRig, args: tuple[int, ...], expected: int) -> None:
    assert s1.hvc(HVC_FREE_DOMAIN, *args) == expected


@pytest.mark.parametrize("name", [HVC_ATTACH_DEV, HVC_DETACH_DEV])
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1, 1, SID, 0), -errno.ENODEV),  # no second SMMU
        ((1, U64, SID, 0), -errno.ENODEV),
        ((1, 0, 1 << 16, 0), -errno.EINVAL),  # beyond SIDSIZE
        ((1, 0, SID, 1), -errno.EOPNOTSUPP),  # PASIDs are not supported
        ((9, 0, SID, 0), -errno.ENOENT),
        ((1, 0, SID), -errno.EINVAL),
    ],
)
def test_attach_detach_arguments(s1: PvRig, name: str, args: tuple[int, ...], expected: int) -> None:
    assert s1.hvc(name, *args) == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1, IOVA, BUF, PAGE, 1, RW), PAGE),
        ((9, IOVA, BUF, PAGE, 1, RW), -errno.ENOENT),
        ((0, IOVA, BUF, PAGE, 1, RW), -errno.EINVAL),  # the identity domain
        ((1, IOVA, BUF, PAGE, 1, 0x40), -errno.EINVAL),  # unknown prot bit
        ((1, IOVA, BUF, PAGE, 1, int(Prot.CACHE)), -errno.EINVAL),  # neither read nor write
        ((1, IOVA, BUF, 0x3000, 1, RW), -errno.EINVAL),  # not a power of two
        ((1, IOVA, BUF, 1 << 13, 1, RW), -errno.EINVAL),  # not a supported page size
        ((1, IOVA, BUF, PAGE, 0, RW), -errno.EINVAL),
        ((1, IOVA + 0x800, BUF, PAGE, 1, RW), -errno.EINVAL),  # misaligned iova
        ((1, IOVA, BUF + 0x800, PAGE, 1, RW), -errno.EINVAL),  # misaligned paddr
        ((1, IOVA, BUF, PAGE, U64, RW), -errno.EOVERFLOW),  # pgsize * pgcount wraps
        ((1, U64 - PAGE + 1, BUF, PAGE, 2, RW), -errno.EOVERFLOW),  # iova + size wraps
        ((1, IOVA, U64 - PAGE + 1, PAGE, 2, RW), -errno.EOVERFLOW),  # paddr + size wraps
        ((1, 1 << 48, BUF, PAGE, 1, RW), -errno.ERANGE),  # beyond the domain's IAS
        ((1, IOVA, 1 << 48, PAGE, 1, RW), -errno.ERANGE),  # beyond the PA range
        ((1, IOVA, SMMU_BASE, PAGE, 1, RW), -errno.EPERM),  # the SMMU's own registers
        ((1, IOVA, RAM_BASE + RAM_SIZE - PAGE, PAGE, 2, RW), -errno.EINVAL),  # memory + hole
        ((1, IOVA, TOPUP, PAGE, 1, RW), -errno.EPERM),  # donated to the hyp's pool
        ((1, IOVA, BUF, PAGE, 1), -errno.EINVAL),
    ],
)
def test_map_pages_arguments(s1: PvRig, args: tuple[int, ...], expected: int) -> None:
    assert s1.hvc(HVC_MAP_PAGES, *args) == expected
    if expected < 0:
        assert not s1.pkvm.mem_protect._dma_refs  # a refused map takes no reference


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1, IOVA, PAGE, 1), PAGE),
        ((1, IOVA + PAGE, PAGE, 1), 0),  # nothing mapped there
        ((9, IOVA, PAGE, 1), -errno.ENOENT),
        ((0, IOVA, PAGE, 1), -errno.EINVAL),
        ((1, IOVA, 0x3000, 1), -errno.EINVAL),
        ((1, IOVA, PAGE, 0), -errno.EINVAL),
        ((1, IOVA + 0x10, PAGE, 1), -errno.EINVAL),
        ((1, IOVA, PAGE, U64), -errno.EOVERFLOW),
        ((1, U64 - PAGE + 1, PAGE, 2), -errno.EOVERFLOW),
        ((1, 1 << 48, PAGE, 1), -errno.ERANGE),
    ],
)
def test_unmap_pages_arguments(s1: PvRig, args: tuple[int, ...], expected: int) -> None:
    assert s1.hvc(HVC_MAP_PAGES, 1, IOVA, BUF, PAGE, 1, RW) == PAGE
    assert s1.hvc(HVC_UNMAP_PAGES, *args) == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1, IOVA), BUF),
        ((1, IOVA + 0x123), BUF + 0x123),
        ((1, IOVA + PAGE), 0),
        ((1, U64), 0),
        ((9, IOVA), -errno.ENOENT),
        ((0, IOVA), -errno.EINVAL),
    ],
)
def test_iova_to_phys_arguments(s1: PvRig, args: tuple[int, ...], expected: int) -> None:
    assert s1.hvc(HVC_MAP_PAGES, 1, IOVA, BUF, PAGE, 1, RW) == PAGE
    assert s1.hvc(HVC_IOVA_TO_PHYS, *args) == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((TOPUP >> 12, 1), -errno.EPERM),  # already donated
        ((SMMU_BASE >> 12, 1), -errno.EPERM),  # not memory
        ((BUF >> 12, TOPUP_MAX_PAGES + 1), -errno.EINVAL),
        ((BUF >> 12, 0), -errno.EINVAL),
        ((1 << 40, 1), -errno.EINVAL),  # beyond the PA range
        ((BUF >> 12, 2), 0),
    ],
)
def test_topup_pool_arguments(r: PvRig, args: tuple[int, ...], expected: int) -> None:
    assert r.hvc(HVC_TOPUP_POOL, *args) == expected


def test_the_smmu_declares_its_event_queue_and_the_domain_tables(s1: PvRig) -> None:
    declared = s1.pv.driver.smmu_at(s1.smmu.base)
    assert declared is s1.hyp
    structures = s1.hyp.smmu_structures()
    assert [what for _, _, what in structures.writes] == ["hyp event queue"]
    assert (TOPUP, 64 * PAGE, "IOMMU host pool") in structures.reads
    assert s1.pv.driver.smmu_at(0) is None
