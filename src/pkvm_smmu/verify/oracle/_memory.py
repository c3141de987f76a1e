"""The oracle's view of physical memory: what the SMMU would read, without a bus access.

Reading through the bus would show up to observers (the sanitizer, the oracle's own dirty
tracking) as accesses nobody made. Reads are noted in the memo so that a later write to the page
drops what was derived from it.
"""

from __future__ import annotations

from enum import Enum

from pkvm_smmu.machine.bus import RegionKind, SystemBus
from pkvm_smmu.machine.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.verify.oracle._memo import DependencyMemo


class Backing(Enum):
    RAM = "ram"
    MMIO = "mmio"  # a device answers: contents are whatever it returns
    NONE = "none"  # nothing decodes the address: the access aborts


class MemoryView:
    def __init__(self, bus: SystemBus, memo: DependencyMemo) -> None:
        self.bus = bus
        self.memo = memo
        self._ram = bus.ram

    def backing(self, address: int, length: int) -> Backing:
        region = self.bus.region_at(address)
        if region is None or not region.contains(address, length):
            return Backing.NONE
        return Backing.RAM if region.kind is RegionKind.RAM else Backing.MMIO

    def read(self, address: int, length: int) -> bytes | None:
        """``length`` bytes of RAM at ``address``; None when the range is not all RAM."""
        if self.backing(address, length) is not Backing.RAM:
            return None
        first = address >> PAGE_SHIFT
        self.memo.note_pages(first, (address + length - 1) >> PAGE_SHIFT)
        offset = address & PAGE_MASK
        if offset + length <= PAGE_SIZE:
            page = self._ram.page_if_backed(first)
            return bytes(length) if page is None else bytes(page[offset : offset + length])
        return self._ram.read(address, length)


__all__ = ["Backing", "MemoryView"]
