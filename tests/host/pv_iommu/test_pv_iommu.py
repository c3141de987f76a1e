"""The generic paravirtual IOMMU driver's ``iommu_ops`` against a scripted hypervisor, and the ABI
copy the host keeps of the hyp's."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

import pytest

import pkvm_smmu.arch.pv_iommu_abi as host_abi
from pkvm_smmu.host.iommu.ops import DomainType, IommuFwspec
from pkvm_smmu.host.pv_iommu import PvIommuEnv, PvIommuOps, PvPagingDomain, ViommuInfo
from pkvm_smmu.host.pv_iommu.ops import TOPUP_PAGES
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.prot import Prot
from pkvm_smmu.trace import RecordingSink, TraceBus

PAGE = 4096


@dataclass
class ScriptedHyp:
    """Answers hypercalls from a table; records every call."""

    caps: int
    calls: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    map_results: list[int] = field(default_factory=list)

    def hvc(self, name: str, *args: int) -> int:
        assert all(type(a) is int for a in args), args  # registers hold plain integers
        self.calls.append((name, args))
        if name == host_abi.HVC_CAPS:
            return {0: self.caps, 1: 0x40201000, 2: 48}[args[1]]
        if name == host_abi.HVC_MAP_PAGES:
            return self.map_results.pop(0) if self.map_results else args[3] * args[4]
        return 0

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class Mm:
    def __init__(self) -> None:
        self.next = 0x9000_0000
        self.freed: list[int] = []

    def alloc_pages(self, count: int, align: int = 1) -> int | None:
        pa = self.next
        self.next += count * PAGE
        return pa

    def free_pages(self, pa: int, count: int) -> int:
        self.freed.append(pa)
        return 0


@dataclass
class Dev:
    name: str
    sids: list[int]
    iommu_fwspec: Any = None

    def __post_init__(self) -> None:
        self.iommu_fwspec = IommuFwspec("smmu", list(self.sids))


def ops_for(caps: int) -> tuple[PvIommuOps, ScriptedHyp]:
    hyp = ScriptedHyp(caps)
    trace = TraceBus()
    trace.attach(RecordingSink())
    return PvIommuOps(ViommuInfo(3, "pviommu", "smmu"), PvIommuEnv(hyp, Mm(), trace)), hyp


def test_identity_only_ops_offer_identity_and_blocked() -> None:
    ops, hyp = ops_for(host_abi.Caps.IDENTITY | host_abi.Caps.BLOCKING)
    assert ops.identity_domain is not None and ops.blocked_domain is not None
    assert ops.domain_alloc_paging(Dev("d", [1])) == -errno.EOPNOTSUPP
    dev = Dev("d", [5, 5, 6])
    assert ops.def_domain_type(dev) is DomainType.IDENTITY  # the DMA API runs in identity mode
    assert ops.probe_device(dev) is ops
    # Devices start blocked: one attach_blocking per distinct StreamID, on the right IOMMU.
    assert hyp.calls[-2:] == [(host_abi.HVC_ATTACH_BLOCKING, (3, 5)), (host_abi.HVC_ATTACH_BLOCKING, (3, 6))]
    assert ops.identity_domain.attach_dev(dev) == 0
    assert hyp.calls[-1] == (host_abi.HVC_ATTACH_IDENTITY, (3, 6))
    ops.release_device(dev)
    assert hyp.calls[-1] == (host_abi.HVC_ATTACH_BLOCKING, (3, 6))


def test_a_refused_blocking_attach_fails_the_probe() -> None:
    ops, hyp = ops_for(host_abi.Caps.IDENTITY | host_abi.Caps.BLOCKING)
    hyp.hvc = lambda name, *args: -errno.EINVAL if name == host_abi.HVC_ATTACH_BLOCKING else 3  # type: ignore[method-assign]
    assert ops.probe_device(Dev("d", [1 << 20])) == -errno.EINVAL
    assert ops.master_of(Dev("d", [1])) is None


def test_no_iommu_means_no_ops() -> None:
    ops, _ = ops_for(-errno.ENODEV)
    assert ops.error == -errno.ENODEV and not ops.caps


def test_paging_domain_map_resumes_after_partial_progress_and_topup() -> None:
    ops, hyp = ops_for(int(host_abi.Caps.IDENTITY | host_abi.Caps.BLOCKING | host_abi.Caps.PAGING))
    assert ops.def_domain_type(Dev("d", [1])) is None
    domain = ops.domain_alloc_paging(Dev("d", [1]))
    assert isinstance(domain, PvPagingDomain) and domain.domain_id == 1
    assert domain.pgsize_bitmap == 0x40201000 and domain.aperture_end == (1 << 48) - 1
    dev = Dev("d", [7])
    assert ops.probe_device(dev) is ops
    assert domain.attach_dev(dev) == 0
    assert hyp.calls[-1] == (host_abi.HVC_ATTACH_DEV, (1, 3, 7, 0))
    hyp.map_results = [2 * PAGE, -errno.ENOMEM]  # two pages, then the pool is empty
    prot = Prot.READ | Prot.WRITE
    assert domain.map_pages(0x10000, 0x8000_0000, PAGE, 4, prot) == (4 * PAGE, 0)
    maps = [args for name, args in hyp.calls if name == host_abi.HVC_MAP_PAGES]
    assert maps == [
        (1, 0x10000, 0x8000_0000, PAGE, 4, int(prot)),
        (1, 0x12000, 0x8000_2000, PAGE, 2, int(prot)),
        (1, 0x12000, 0x8000_2000, PAGE, 2, int(prot)),
    ]
    assert (host_abi.HVC_TOPUP_POOL, (0x9000_0000 >> 12, TOPUP_PAGES)) in hyp.calls
    assert domain.unmap_pages(0x10000, PAGE, 4, IotlbGather()) == 0  # scripted hyp answers 0
    domain.free()
    assert hyp.calls[-1] == (host_abi.HVC_FREE_DOMAIN, (1,))
    assert ops.domain_alloc_paging(Dev("d", [1])).domain_id == 1  # type: ignore[union-attr]


def test_map_gives_up_on_errors() -> None:
    ops, hyp = ops_for(int(host_abi.Caps.PAGING | host_abi.Caps.BLOCKING))
    domain = ops.domain_alloc_paging(Dev("d", [1]))
    assert isinstance(domain, PvPagingDomain)
    hyp.map_results = [PAGE, -errno.EPERM]
    assert domain.map_pages(0, 0x8000_0000, PAGE, 2, Prot.READ) == (PAGE, -errno.EPERM)
    hyp.map_results = [-errno.ENOMEM] * 20
    assert domain.map_pages(0, 0x8000_0000, PAGE, 1, Prot.READ) == (0, -errno.ENOMEM)


@pytest.mark.parametrize("caps", [0, int(host_abi.Caps.IDENTITY)])
def test_missing_blocked_domain(caps: int) -> None:
    ops, _ = ops_for(caps)
    assert ops.blocked_domain is None
