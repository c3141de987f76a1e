"""``host_use_dma``/``host_unuse_dma`` in ``mem_protect`` (RFC v2 / ACK ``__pkvm_host_use_dma``), and
random hypercall sequences from a malicious host that must never make the hyp raise."""

from __future__ import annotations

import errno
import os
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkvm_smmu.arch.pv_iommu_abi import (
    HVC_ALLOC_DOMAIN,
    HVC_ATTACH_BLOCKING,
    HVC_ATTACH_DEV,
    HVC_ATTACH_IDENTITY,
    HVC_CAPS,
    HVC_DETACH_DEV,
    HVC_FREE_DOMAIN,
    HVC_IOVA_TO_PHYS,
    HVC_MAP_PAGES,
    HVC_TOPUP_POOL,
    HVC_UNMAP_PAGES,
)
from pkvm_smmu.hyp.contracts import KvmPgtableProt
from pkvm_smmu.hyp.mem_protect import HYP_DMA_REFCOUNT_MAX, MemProtect
from pkvm_smmu.hyp.pv.identity import PvIdentityIommu
from pkvm_smmu.hyp.pv.paging import PvPagingIommu
from pkvm_smmu.machine.bus import SystemBus
from pkvm_smmu.trace import TraceBus

sys.path.insert(0, os.path.dirname(__file__))
from pv_rig import BUF, RAM_BASE, SMMU_BASE, TOPUP, make_pv_rig

RAM = 0x8000_0000
PFN = RAM >> 12


def mem() -> MemProtect:
    bus = SystemBus()
    bus.add_ram(RAM, 0x100_0000)
    return MemProtect(bus, TraceBus())


def test_use_and_unuse_count_per_page() -> None:
    mp = mem()
    assert mp.host_use_dma(PFN, 2) == 0
    assert mp.host_use_dma(PFN + 1, 1) == 0
    assert (mp.dma_refcount(PFN), mp.dma_refcount(PFN + 1)) == (1, 2)
    assert mp.host_unuse_dma(PFN, 2) == 0
    assert (mp.dma_refcount(PFN), mp.dma_refcount(PFN + 1)) == (0, 1)
    assert mp.host_unuse_dma(PFN, 2) == -errno.EINVAL  # PFN has none left: nothing changes
    assert mp.dma_refcount(PFN + 1) == 1


def test_only_pages_the_host_may_map_are_counted() -> None:
    mp = mem()
    assert mp.host_donate_hyp(PFN, 1) == 0
    assert mp.host_use_dma(PFN, 1) == -errno.EPERM  # the hyp's
    assert mp.host_share_hyp(PFN + 1) == 0
    assert mp.host_use_dma(PFN + 1, 1) == -errno.EPERM  # shared with the hyp
    assert mp.init_vm(1) == 0
    assert mp.host_share_guest(1, PFN + 2, 0x10, KvmPgtableProt.R | KvmPgtableProt.W) == 0
    assert mp.host_use_dma(PFN + 2, 1) == 0  # shared with a guest: still the host's
    assert mp.host_use_dma(PFN + 0x1000, 1) == 0  # past the end of RAM: not memory, not counted
    assert mp.dma_refcount(PFN + 0x1000) == 0
    assert mp.host_use_dma(PFN + 0xFFF, 2) == -errno.EINVAL  # straddles RAM and the hole
    assert mp.host_use_dma(0x9000, 4) == 0  # host MMIO (an MSI doorbell): allowed, not counted
    assert mp.dma_refcount(0x9000) == 0
    assert mp.host_donate_hyp_mmio(0x9000) == 0
    assert mp.host_use_dma(0x9000, 1) == -errno.EPERM  # MMIO the hyp owns
    assert mp.host_use_dma(PFN, 0) == -errno.EINVAL
    assert mp.host_use_dma(-1, 1) == -errno.EINVAL


def test_every_donation_and_share_refuses_a_referenced_page() -> None:
    mp = mem()
    assert mp.init_vm(1) == 0
    assert mp.host_use_dma(PFN, 1) == 0
    assert mp.host_donate_hyp(PFN, 1) == -errno.EBUSY
    assert mp.host_donate_hyp(PFN, 2) == -errno.EBUSY
    assert mp.host_share_hyp(PFN) == -errno.EBUSY
    assert mp.host_donate_guest(1, PFN, 0x10) == -errno.EBUSY
    assert mp.host_share_guest(1, PFN, 0x10, KvmPgtableProt.R) == -errno.EBUSY
    assert mp.host_unuse_dma(PFN, 1) == 0
    assert mp.host_donate_guest(1, PFN, 0x10) == 0


def test_refcount_saturates() -> None:
    mp = mem()
    mp._dma_refs[PFN] = HYP_DMA_REFCOUNT_MAX
    assert mp.host_use_dma(PFN, 1) == -errno.EOVERFLOW


_U64 = st.one_of(
    st.integers(0, 64),
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([BUF, BUF + 0x1000, TOPUP, RAM_BASE, SMMU_BASE, 0x1000, 0x20_0000, 1 << 48]),
    st.integers(-2, 2),
)
_NAMES = [
    HVC_CAPS,
    HVC_ATTACH_IDENTITY,
    HVC_ATTACH_BLOCKING,
    HVC_ALLOC_DOMAIN,
    HVC_FREE_DOMAIN,
    HVC_ATTACH_DEV,
    HVC_DETACH_DEV,
    HVC_MAP_PAGES,
    HVC_UNMAP_PAGES,
    HVC_IOVA_TO_PHYS,
    HVC_TOPUP_POOL,
]
_CALLS = st.lists(st.tuples(st.sampled_from(_NAMES), st.lists(_U64, min_size=0, max_size=7)), max_size=25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=_CALLS, paging=st.booleans())
def test_random_hypercalls_never_raise(calls: list[tuple[str, list[int]]], paging: bool) -> None:
    r = make_pv_rig(PvPagingIommu if paging else PvIdentityIommu)
    assert r.init_result == 0
    mp = r.pkvm.mem_protect
    for name, args in calls:
        result = r.pkvm.hvc(name, *args)
        assert isinstance(result, int)
    # Whatever happened, no page the hyp owns is referenced for DMA, and every referenced page is
    # still the host's.
    for pfn in list(mp._dma_refs):
        assert mp.host_can_access(pfn)
