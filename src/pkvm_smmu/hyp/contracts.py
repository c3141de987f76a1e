"""Names shared inside the hypervisor: page states and owners (pKVM ``mem_protect.c`` vocabulary),
and the hooks through which page ownership and host data aborts reach the hyp IOMMU code.

``mem_protect`` implements the state machine; ``iommu`` and ``smmuv3`` consume these hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntFlag
from typing import Protocol

from pkvm_smmu.pgtable.prot import Prot


class PageState(Enum):
    """A page's state in one component's view (host, hyp, or a guest)."""

    OWNED = "owned"  # exclusively owned and accessible
    SHARED_OWNED = "shared-owned"  # owned, and shared with another component
    SHARED_BORROWED = "shared-borrowed"  # accessible, owned by another component
    NOPAGE = "nopage"  # not accessible to this component


@dataclass(frozen=True, slots=True)
class Owner:
    """A component that can own pages: the host, the hypervisor, or a protected VM."""

    kind: str  # "host", "hyp" or "guest"
    vm_id: int = 0

    def __str__(self) -> str:
        return f"guest{self.vm_id}" if self.kind == "guest" else self.kind


HOST = Owner("host")
HYP = Owner("hyp")


def guest(vm_id: int) -> Owner:
    return Owner("guest", vm_id)


class HostOwnershipListener(Protocol):
    """Told of every change of what the host may access, before the transition returns (v4 patch 10:
    ``host_stage2_set_owner_locked`` calls the IOMMU driver). ``prot`` is the host's new access to the
    range (``Prot.NONE`` when the host loses it); ``is_mmio`` says whether the range is MMIO."""

    def host_access_changed(self, pfn: int, nr_pages: int, prot: Prot, is_mmio: bool) -> None: ...


class DataAbortHandler(Protocol):
    """The hyp IOMMU driver's ``dabt_handler`` (v4 patch 12): handle a host access to a page the
    hypervisor owns. Returns the read value (or 0 for a write) when handled, None when not."""

    def handle_host_dabt(self, address: int, size: int, is_write: bool, value: int) -> int | None: ...


class KvmPgtableProt(IntFlag):
    """``enum kvm_pgtable_prot``: permissions and memory type of a hyp stage-1 or guest stage-2 leaf
    (same bit values as the kernel's)."""

    NONE = 0
    X = 1 << 0
    W = 1 << 1
    R = 1 << 2
    DEVICE = 1 << 3
    NORMAL_NC = 1 << 4


PAGE_HYP = KvmPgtableProt.R | KvmPgtableProt.W
PAGE_HYP_NC = PAGE_HYP | KvmPgtableProt.NORMAL_NC  # v4 patch 01: queues of a non-coherent SMMU
PAGE_HYP_DEVICE = PAGE_HYP | KvmPgtableProt.DEVICE
KVM_PGTABLE_PROT_RWX = KvmPgtableProt.R | KvmPgtableProt.W | KvmPgtableProt.X


class KvmIommuDriver(Protocol):
    """The hyp IOMMU driver (v4 patch 09, ``struct kvm_iommu_ops``): exactly one, registered before
    pKVM initialises. ``kvm_iommu_pages`` sizes its pool in the hyp carveout (patch 11); ``init`` runs
    from ``__pkvm_init_finalise`` and a non-zero result fails pKVM's initialisation. A driver that
    also implements ``DataAbortHandler`` gets the first chance at host aborts on non-memory pages."""

    def kvm_iommu_pages(self) -> int: ...

    def init(self) -> int: ...
