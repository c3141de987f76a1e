"""The paravirtual IOMMU's ``iommu_ops``: nothing SMMUv3-specific, every change is a hypercall.

What the hyp offers (``caps``) decides the domains: identity and blocked only under pv-identity (the
driver then requires identity default domains, so the DMA API runs in identity mode); paging
domains too under pv-paging, whose map/unmap are hypercalls. Devices start blocked: ``probe_device``
attaches the blocked domain before the IOMMU core attaches the default one.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    IDENTITY_DOMAIN_ID,
    IOMMU_NO_PASID,
    MAX_DOMAINS,
    Caps,
    CapsQuery,
)
from pkvm_smmu.arch.pv_iommu_abi import DomainType as HypDomainType
from pkvm_smmu.host.hw import Hvc
from pkvm_smmu.host.iommu.ops import DomainType, IommuCap, IommuDomain, IommuFwspec, IommuResvRegion
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.prot import Prot
from pkvm_smmu.trace import TraceBus

COMPONENT = "host.pv_iommu"
PAGE_SHIFT = 12
TOPUP_PAGES = 16  # pages donated per -ENOMEM (RFC v2: the hyp's memory request)
MAX_TOPUPS = 8  # per hypercall, before giving up with -ENOMEM


class PageSource(Protocol):
    """The host page allocator the driver donates pool pages from (``host.mm.HostMemory``)."""

    def alloc_pages(self, count: int, align: int = 1) -> int | None: ...

    def free_pages(self, pa: int, count: int) -> int: ...


@dataclass(frozen=True)
class ViommuInfo:
    """What the pKVM SMMU driver tells the paravirtual driver about one virtualized IOMMU."""

    index: int  # the hyp's IOMMU id
    name: str
    fwnode: Any  # the physical IOMMU's firmware node: consumers' ``iommus`` point at it
    coherent: bool = True


@dataclass(eq=False)
class PvMaster:
    dev: Any
    sids: list[int]
    domain_id: int | None = None  # what the hyp attached the StreamIDs to (pv-paging)
    domain: IommuDomain | None = None


class DomainIds:
    """The host's ``ida`` of hyp domain ids (shared by every virtualized IOMMU)."""

    def __init__(self) -> None:
        self._used: set[int] = set()

    def alloc(self) -> int | None:
        return next((i for i in range(IDENTITY_DOMAIN_ID + 1, MAX_DOMAINS) if i not in self._used), None)

    def take(self, domain_id: int) -> None:
        self._used.add(domain_id)

    def release(self, domain_id: int) -> None:
        self._used.discard(domain_id)


@dataclass
class PvIommuEnv:
    hvc: Hvc
    mm: PageSource
    trace: TraceBus
    domain_ids: DomainIds = field(default_factory=DomainIds)


class PvStaticDomain(IommuDomain):
    """The identity and blocked domains: one hypercall per StreamID."""

    def __init__(self, ops: PvIommuOps, domain_type: DomainType) -> None:
        super().__init__(domain_type)
        self.ops = ops

    def attach_dev(self, dev: Any) -> int:
        ops = self.ops
        master = ops.master_of(dev)
        if master is None:
            return -errno.ENODEV
        identity = self.type is DomainType.IDENTITY
        for sid in dict.fromkeys(master.sids):
            if not ops.caps & Caps.PAGING:
                name = HVC_ATTACH_IDENTITY if identity else HVC_ATTACH_BLOCKING
                ret = ops.hvc(name, ops.info.index, sid)
            elif identity:
                ret = ops.hvc(HVC_ATTACH_DEV, IDENTITY_DOMAIN_ID, ops.info.index, sid, IOMMU_NO_PASID)
            elif master.domain_id is not None:
                ret = ops.hvc(HVC_DETACH_DEV, master.domain_id, ops.info.index, sid, IOMMU_NO_PASID)
            else:
                ret = 0  # the hyp's STEs start ABORT
            if ret:
                return ret
        master.domain_id = IDENTITY_DOMAIN_ID if identity else None
        master.domain = self
        return 0


class PvPagingDomain(IommuDomain):
    """A paging domain the hyp holds; the host only names it by id."""

    def __init__(self, ops: PvIommuOps, domain_id: int) -> None:
        super().__init__(DomainType.UNMANAGED, ops.pgsize_bitmap, ops.ias)
        self.ops = ops
        self.domain_id = domain_id

    def attach_dev(self, dev: Any) -> int:
        ops = self.ops
        master = ops.master_of(dev)
        if master is None:
            return -errno.ENODEV
        for sid in dict.fromkeys(master.sids):
            ret = ops.hvc_retry(HVC_ATTACH_DEV, self.domain_id, ops.info.index, sid, IOMMU_NO_PASID)
            if ret:
                return ret
        master.domain_id = self.domain_id
        master.domain = self
        return 0

    def map_pages(self, iova: int, paddr: int, pgsize: int, pgcount: int, prot: Prot) -> tuple[int, int]:
        """As many hypercalls as partial progress needs; the pool is topped up on -ENOMEM."""
        ops = self.ops
        mapped = 0
        topups = 0
        while pgcount:
            ret = ops.hvc(HVC_MAP_PAGES, self.domain_id, iova, paddr, pgsize, pgcount, int(prot))
            if ret == -errno.ENOMEM and topups < MAX_TOPUPS:
                topups += 1
                err = ops.topup()
                if err:
                    return mapped, err
                continue
            if ret <= 0:
                return mapped, ret if ret else -errno.EIO
            mapped += ret
            iova += ret
            paddr += ret
            pgcount -= ret // pgsize
        return mapped, 0

    def unmap_pages(self, iova: int, pgsize: int, pgcount: int, gather: IotlbGather) -> int:
        # The hyp invalidated (TLBI + CMD_SYNC) before returning: nothing to gather.
        ret = self.ops.hvc(HVC_UNMAP_PAGES, self.domain_id, iova, pgsize, pgcount)
        return max(ret, 0)

    def iova_to_phys(self, iova: int) -> int:
        ret = self.ops.hvc(HVC_IOVA_TO_PHYS, self.domain_id, iova)
        return max(ret, 0)

    def free(self) -> None:
        ops = self.ops
        ret = ops.hvc(HVC_FREE_DOMAIN, self.domain_id)
        if ret:
            ops.emit("warn", message="free_domain failed", domain=self.domain_id, error=ret)
        else:
            ops.env.domain_ids.release(self.domain_id)


class PvIommuOps:
    """``iommu_ops`` of one virtualized IOMMU."""

    def __init__(self, info: ViommuInfo, env: PvIommuEnv) -> None:
        self.info = info
        self.env = env
        flags = self.hvc(HVC_CAPS, info.index, CapsQuery.FLAGS)
        self.caps = Caps(flags) if flags > 0 else Caps(0)
        self.error = flags if flags < 0 else 0
        paging = bool(self.caps & Caps.PAGING)
        self.pgsize_bitmap = max(self.hvc(HVC_CAPS, info.index, CapsQuery.PGSIZE_BITMAP), 0) if paging else 0
        self.ias = max(self.hvc(HVC_CAPS, info.index, CapsQuery.IAS), 0) if paging else 0
        self.identity_domain: IommuDomain | None = (
            PvStaticDomain(self, DomainType.IDENTITY) if self.caps & Caps.IDENTITY else None
        )
        self.blocked_domain: IommuDomain | None = (
            PvStaticDomain(self, DomainType.BLOCKED) if self.caps & Caps.BLOCKING else None
        )
        self._masters: dict[int, PvMaster] = {}

    def emit(self, kind: str, **fields: Any) -> None:
        if self.env.trace.enabled:
            self.env.trace.emit(COMPONENT, kind, iommu=self.info.name, **fields)

    def master_of(self, dev: Any) -> PvMaster | None:
        return self._masters.get(id(dev))

    def hvc(self, name: str, *args: int) -> int:
        """Arguments go in registers: plain integers."""
        return self.env.hvc.hvc(name, *(int(arg) for arg in args))

    # -- memory requests ---------------------------------------------------------------------------------
    def topup(self) -> int:
        """Donate ``TOPUP_PAGES`` to the hyp's IOMMU pool."""
        mm = self.env.mm
        pa = mm.alloc_pages(TOPUP_PAGES)
        if pa is None:
            return -errno.ENOMEM
        ret = self.hvc(HVC_TOPUP_POOL, pa >> PAGE_SHIFT, TOPUP_PAGES)
        if ret:
            mm.free_pages(pa, TOPUP_PAGES)
        self.emit("topup", pa=pa, pages=TOPUP_PAGES, result=ret)
        return ret

    def hvc_retry(self, name: str, *args: int) -> int:
        """A hypercall that may need pool pages: topped up and retried on -ENOMEM."""
        for _ in range(MAX_TOPUPS):
            ret = self.hvc(name, *args)
            if ret != -errno.ENOMEM:
                return ret
            err = self.topup()
            if err:
                return err
        return self.hvc(name, *args)

    # -- iommu_ops ----------------------------------------------------------------------------------------
    def of_xlate(self, dev: Any, args: list[int]) -> int:
        fwspec = getattr(dev, "iommu_fwspec", None)
        if not isinstance(fwspec, IommuFwspec) or not args:
            return -errno.EINVAL
        fwspec.ids.append(int(args[0]))
        return 0

    def probe_device(self, dev: Any) -> Any:
        """A master for the device's StreamIDs, blocked until the core attaches its domain."""
        if id(dev) in self._masters:
            return -errno.EBUSY
        fwspec = getattr(dev, "iommu_fwspec", None)
        if not isinstance(fwspec, IommuFwspec) or not fwspec.ids:
            return -errno.ENODEV
        master = PvMaster(dev, list(fwspec.ids))
        self._masters[id(dev)] = master
        ret = self.blocked_domain.attach_dev(dev) if self.blocked_domain is not None else 0
        self.emit("probe_device", dev=getattr(dev, "name", "?"), sids=master.sids, result=ret)
        if ret:
            del self._masters[id(dev)]
            return ret
        return self

    def release_device(self, dev: Any) -> None:
        if id(dev) not in self._masters:
            return
        if self.blocked_domain is not None:
            self.blocked_domain.attach_dev(dev)
        del self._masters[id(dev)]

    def domain_alloc_paging(self, dev: Any) -> IommuDomain | int:
        if not self.caps & Caps.PAGING:
            return -errno.EOPNOTSUPP
        domain_id = self.env.domain_ids.alloc()
        if domain_id is None:
            return -errno.ENOSPC
        ret = self.hvc_retry(HVC_ALLOC_DOMAIN, domain_id, HypDomainType.ANY)
        self.emit("domain_alloc", domain=domain_id, result=ret)
        if ret:
            return ret
        self.env.domain_ids.take(domain_id)
        return PvPagingDomain(self, domain_id)

    def def_domain_type(self, dev: Any) -> DomainType | None:
        """Without paging the DMA API can only run in identity mode: say so to the core."""
        return None if self.caps & Caps.PAGING else DomainType.IDENTITY

    def capable(self, dev: Any, cap: IommuCap) -> bool:
        if cap is IommuCap.CACHE_COHERENCY:
            return self.info.coherent
        return cap is IommuCap.NOEXEC

    def get_resv_regions(self, dev: Any) -> list[IommuResvRegion]:
        return []


__all__ = [
    "COMPONENT",
    "DomainIds",
    "PvIommuEnv",
    "PvIommuOps",
    "PvMaster",
    "PvPagingDomain",
    "PvStaticDomain",
    "ViommuInfo",
]
