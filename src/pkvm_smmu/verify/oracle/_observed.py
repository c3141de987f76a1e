"""The observed mode: every DMA and every access the SMMU makes, checked as it happens.

Exact for what occurred and cheap (one dict probe per page touched); it says nothing about what
could have happened, which is the static check's job.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass

from pkvm_smmu.machine.bus import Access, InitiatorKind, SystemBus
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.verify.oracle._ownership import OwnershipView, StructuresSource
from pkvm_smmu.verify.oracle._runs import merge_ranges


@dataclass(frozen=True, slots=True)
class ObservedViolation:
    """One access that touched a page its initiator's owner (the host) may not access."""

    initiator: str  # the bus initiator, as it names itself
    actor: str  # "device" or "smmu"
    sid: int | None
    ssid: int | None
    purpose: str  # for the SMMU: strtab, cd-fetch, walk, cmdq-fetch, evtq-write, msi
    is_write: bool
    address: int
    size: int
    pfn: int
    owner: str

    def __str__(self) -> str:
        who = self.initiator + (f" ({self.purpose})" if self.purpose else "")
        verb = "wrote" if self.is_write else "read"
        where = f"{self.size} bytes at {self.address:#x}"
        return f"{who} {verb} {where}: page {self.pfn:#x} is owned by {self.owner}"


class AccessMonitor:
    """A bus observer recording every device or SMMU access to a page the host may not access
    (SMMU accesses to what the hyp declared for itself excepted)."""

    def __init__(
        self, bus: SystemBus, ownership: OwnershipView, declared: Mapping[str, StructuresSource] | None = None
    ) -> None:
        self.bus = bus
        self.ownership = ownership
        self.declared = dict(declared or {})
        self.violations: list[ObservedViolation] = []
        self._ranges: dict[tuple[str, bool], list[tuple[int, int]]] = {}  # (SMMU, write) -> declared
        bus.observers.append(self._observe)

    def close(self) -> None:
        if self._observe in self.bus.observers:
            self.bus.observers.remove(self._observe)

    def refresh(self) -> None:
        """Forget the cached declarations (the hyp may have withdrawn some)."""
        self._ranges.clear()

    def take(self) -> list[ObservedViolation]:
        """The violations recorded so far, forgetting them."""
        out, self.violations = self.violations, []
        return out

    def _observe(self, access: Access) -> None:
        initiator = access.initiator
        kind = initiator.kind
        if access.aborted or (kind is not InitiatorKind.DEVICE and kind is not InitiatorKind.SMMU):
            return
        blocked = self.ownership.blocked
        if not blocked:
            return
        address = access.address
        first = address >> PAGE_SHIFT
        last = (address + max(access.size, 1) - 1) >> PAGE_SHIFT
        for pfn in range(first, last + 1):
            owner = blocked.get(pfn)
            if owner is not None and not (kind is InitiatorKind.SMMU and self._declared(access, pfn)):
                actor = "device" if kind is InitiatorKind.DEVICE else "smmu"
                self.violations.append(
                    ObservedViolation(
                        str(initiator),
                        actor,
                        initiator.stream_id,
                        initiator.substream_id,
                        initiator.purpose,
                        access.is_write,
                        address,
                        access.size,
                        pfn,
                        str(owner),
                    )
                )

    def _declared(self, access: Access, pfn: int) -> bool:
        """The hyp declared the page for this SMMU access (cached; asked again before a miss is
        reported, since the hyp may have declared more since)."""
        key = (access.initiator.name, access.is_write)
        cached = self._ranges.get(key)
        if cached is not None and _inside(cached, pfn << PAGE_SHIFT):
            return True
        source = self.declared.get(access.initiator.name)
        if source is None:
            return False
        structures = source()
        ranges = list(structures.writes) if access.is_write else [*structures.reads, *structures.writes]
        merged = merge_ranges((pa, pa + size) for pa, size, _ in ranges)
        self._ranges[key] = merged
        return _inside(merged, pfn << PAGE_SHIFT)


def _inside(ranges: list[tuple[int, int]], address: int) -> bool:
    i = bisect.bisect_right(ranges, (address, 1 << 64)) - 1
    return i >= 0 and ranges[i][1] > address


__all__ = ["AccessMonitor", "ObservedViolation"]
