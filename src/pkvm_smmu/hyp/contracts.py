"""Names shared inside the hypervisor: page states and owners (pKVM ``mem_protect.c`` vocabulary),
and the hooks through which page ownership and host data aborts reach the hyp IOMMU code.

``mem_protect`` implements the state machine; ``iommu`` and ``smmuv3`` consume these hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
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
