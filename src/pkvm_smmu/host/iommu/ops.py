"""The contract between the IOMMU core and IOMMU drivers: Linux's ``iommu_ops`` and
``iommu_domain_ops`` in Python form. Drivers subclass ``IommuDomain`` and implement ``IommuOps``.

Errors are negative errno values (``-errno.ENODEV`` ...), as in the kernel; nothing here raises
for a value the hardware or firmware supplied.

Optional operations (Linux leaves these NULL when a driver has no use for them; the core looks
them up with ``getattr``): ``capable(dev, cap: IommuCap) -> bool``, ``device_group(dev) ->
IommuGroup | int``, ``get_resv_regions(dev) -> list[IommuResvRegion]``, ``probe_finalize(dev)``,
and ``default_domain``: a static domain every device of the driver must use (a driver that can
only switch StreamIDs between identity and blocked).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.prot import Prot


class DomainType(Enum):
    BLOCKED = "blocked"
    IDENTITY = "identity"
    UNMANAGED = "unmanaged"  # a paging domain driven by its user (VFIO-like)
    DMA = "dma"  # a paging domain behind the DMA API, strict invalidation
    DMA_FQ = "dma-fq"  # a paging domain behind the DMA API, lazy invalidation (flush queue)
    NESTED = "nested"

    @property
    def is_paging(self) -> bool:
        return self in (DomainType.UNMANAGED, DomainType.DMA, DomainType.DMA_FQ)


class IommuCap(Enum):
    """What ``capable(dev, cap)`` may be asked (Linux ``enum iommu_cap``)."""

    CACHE_COHERENCY = "cache-coherency"
    NOEXEC = "noexec"
    DEFERRED_FLUSH = "deferred-flush"  # lazy invalidation is cheap: the DMA API may use a flush queue
    DIRTY_TRACKING = "dirty-tracking"


class ResvType(Enum):
    """Linux ``enum iommu_resv_type``."""

    DIRECT = "direct"  # must stay identity-mapped whatever the domain (firmware RMR): no blocking
    DIRECT_RELAXABLE = "direct-relaxable"  # identity-mapped in the default domain, may be dropped
    RESERVED = "reserved"  # never handed out as IOVA
    MSI = "msi"  # hardware MSI window, never IOVA
    SW_MSI = "sw-msi"  # the software-managed MSI window, never IOVA


@dataclass(frozen=True)
class IommuResvRegion:
    """An IOVA range with a fixed purpose for one device (``get_resv_regions``)."""

    start: int
    length: int
    prot: Prot
    type: ResvType


@dataclass
class IommuFwspec:
    """What firmware says about a device's IOMMU: which IOMMU (by fwnode) and which IDs (StreamIDs)."""

    iommu_fwnode: Any
    ids: list[int] = field(default_factory=list)
    ops: IommuOps | None = None  # set once the IOMMU driver has registered for that fwnode


class IommuDomain:
    """A translation context devices can be attached to. Drivers subclass it."""

    def __init__(self, domain_type: DomainType, pgsize_bitmap: int = 0, aperture_bits: int = 0) -> None:
        self.type = domain_type
        self.pgsize_bitmap = pgsize_bitmap
        self.aperture_end = (1 << aperture_bits) - 1 if aperture_bits else 0
        self.devices: list[Any] = []  # kept by the IOMMU core: the devices attached to this domain
        self.owner: Any = None  # the IommuOps that allocated the domain (set by the IOMMU core)
        self.iova_cookie: Any = None  # the DMA API's state for DMA / DMA_FQ domains (IOMMU core)

    # Drivers override what their domain supports; the defaults refuse with -ENODEV.
    def attach_dev(self, dev: Any) -> int:
        return -errno.ENODEV

    def map_pages(self, iova: int, paddr: int, pgsize: int, pgcount: int, prot: Prot) -> tuple[int, int]:
        """Returns (bytes mapped, 0 or -errno)."""
        return 0, -errno.ENODEV  # not a paging domain

    def unmap_pages(self, iova: int, pgsize: int, pgcount: int, gather: IotlbGather) -> int:
        return 0

    def iotlb_sync(self, gather: IotlbGather) -> None:
        """Complete the invalidations ``gather`` collected (strict unmap)."""

    def flush_iotlb_all(self) -> None:
        """Invalidate everything this domain may have in IOTLBs (flush-queue drain)."""

    def free_gathered_tables(self, gather: IotlbGather) -> None:
        """Release the table pages an unmap left in ``gather``, now that no IOTLB or walk cache can
        use them. The core calls it after ``iotlb_sync`` (strict) or after the flush queue's
        ``flush_iotlb_all`` (lazy); drivers over ``IoPageTable`` forward to ``release_freed_tables``."""

    def iova_to_phys(self, iova: int) -> int:
        return 0

    def free(self) -> None:
        """Release the domain's resources."""


class IommuOps(Protocol):
    """Per-driver operations (Linux ``struct iommu_ops``)."""

    pgsize_bitmap: int
    identity_domain: IommuDomain | None
    blocked_domain: IommuDomain | None

    def probe_device(self, dev: Any) -> Any:
        """Returns the driver's per-IOMMU device handle, or a negative errno."""
        ...

    def release_device(self, dev: Any) -> None: ...

    def of_xlate(self, dev: Any, args: list[int]) -> int:
        """Add the IDs in ``args`` (the firmware cells) to the device's fwspec; 0 or -errno."""
        ...

    def domain_alloc_paging(self, dev: Any) -> IommuDomain | int: ...

    def def_domain_type(self, dev: Any) -> DomainType | None:
        """A driver's required default domain type for ``dev``, or None to follow policy."""
        ...
