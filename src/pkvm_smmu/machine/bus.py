"""The system bus: the physical address map (RAM and MMIO regions) and every access made on it.

Each access names its initiator (a CPU at EL1/EL2, a device StreamID, the SMMU itself) so that the
host stage-2 can be applied by the CPU access path and so that observers (the isolation oracle, the
sanitizer) can attribute every read and write. An access that decodes to no region, crosses a region
boundary, or that a device refuses is an ``ExternalAbort`` result, never a Python exception.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from pkvm_smmu.machine.memory import Ram


class InitiatorKind(Enum):
    CPU_EL1 = "cpu-el1"
    CPU_EL2 = "cpu-el2"
    DEVICE = "device"
    SMMU = "smmu"


@dataclass(frozen=True, slots=True)
class Initiator:
    """Who makes an access. ``purpose`` says why the SMMU accesses memory (``ste-fetch``, ``walk``...)."""

    kind: InitiatorKind
    name: str = ""
    stream_id: int | None = None
    substream_id: int | None = None
    purpose: str = ""

    def __str__(self) -> str:
        parts = [self.name or self.kind.value]
        if self.stream_id is not None:
            parts.append(f"sid={self.stream_id:#x}")
        if self.substream_id is not None:
            parts.append(f"ssid={self.substream_id:#x}")
        if self.purpose:
            parts.append(self.purpose)
        return " ".join(parts)


HOST_CPU = Initiator(InitiatorKind.CPU_EL1, "host")
HYP_CPU = Initiator(InitiatorKind.CPU_EL2, "hyp")


@dataclass(frozen=True, slots=True)
class ExternalAbort:
    """The architected result of an access that nothing answered (or a device refused)."""

    address: int
    reason: str

    def __bool__(self) -> bool:  # an abort is never mistaken for a successful value
        return True


class MmioDevice(Protocol):
    """A device's register interface; offsets are relative to the region base."""

    def mmio_read(self, offset: int, size: int, initiator: Initiator) -> int | ExternalAbort: ...

    def mmio_write(
        self, offset: int, size: int, value: int, initiator: Initiator
    ) -> ExternalAbort | None: ...


class RegionKind(Enum):
    RAM = "ram"
    MMIO = "mmio"


@dataclass(frozen=True, slots=True)
class Region:
    base: int
    size: int
    kind: RegionKind
    name: str
    device: MmioDevice | None = None

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.base <= addr and addr + length <= self.base + self.size


@dataclass(frozen=True, slots=True)
class Access:
    """One completed or aborted bus access, as observers see it."""

    initiator: Initiator
    address: int
    size: int
    is_write: bool
    value: int | bytes | None
    aborted: bool


AccessObserver = Callable[[Access], None]
_VALID_MMIO_SIZES = (1, 2, 4, 8)


class SystemBus:
    """Routes physical accesses to RAM or MMIO regions and notifies observers of each one."""

    def __init__(self) -> None:
        self.ram = Ram()
        self._regions: list[Region] = []
        self._bases: list[int] = []
        self.observers: list[AccessObserver] = []

    # -- address map ----------------------------------------------------------------------------
    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    def add_ram(self, base: int, size: int, name: str = "ram") -> Region:
        return self._add(Region(base, size, RegionKind.RAM, name))

    def add_mmio(self, base: int, size: int, device: MmioDevice, name: str) -> Region:
        return self._add(Region(base, size, RegionKind.MMIO, name, device))

    def _add(self, region: Region) -> Region:
        if region.size <= 0 or region.base < 0:
            raise ValueError(f"region {region.name}: bad base/size {region.base:#x}/{region.size:#x}")
        for other in self._regions:
            if region.base < other.end and other.base < region.end:
                raise ValueError(
                    f"region {region.name} [{region.base:#x}, {region.end:#x}) overlaps "
                    f"{other.name} [{other.base:#x}, {other.end:#x})"
                )
        index = bisect.bisect(self._bases, region.base)
        self._regions.insert(index, region)
        self._bases.insert(index, region.base)
        return region

    def region_at(self, addr: int) -> Region | None:
        index = bisect.bisect(self._bases, addr) - 1
        if index >= 0:
            region = self._regions[index]
            if addr < region.base + region.size:
                return region
        return None

    def is_ram(self, addr: int, length: int = 1) -> bool:
        region = self.region_at(addr)
        return region is not None and region.kind is RegionKind.RAM and region.contains(addr, length)

    def ram_regions(self) -> list[Region]:
        return [r for r in self._regions if r.kind is RegionKind.RAM]

    # -- accesses -------------------------------------------------------------------------------
    def read(self, initiator: Initiator, addr: int, size: int) -> int | ExternalAbort:
        """A single-copy access of 1, 2, 4 or 8 bytes (little-endian)."""
        region = self.region_at(addr)
        result: int | ExternalAbort
        if region is None or not region.contains(addr, size):
            result = ExternalAbort(addr, "no region decodes this address")
        elif region.kind is RegionKind.RAM:
            result = self.ram.read_int(addr, size)
        elif size not in _VALID_MMIO_SIZES or addr % size:
            result = ExternalAbort(addr, f"unsupported MMIO access size {size}")
        else:
            assert region.device is not None
            result = region.device.mmio_read(addr - region.base, size, initiator)
        if self.observers:
            value = None if isinstance(result, ExternalAbort) else result
            self._notify(Access(initiator, addr, size, False, value, value is None))
        return result

    def write(self, initiator: Initiator, addr: int, size: int, value: int) -> ExternalAbort | None:
        region = self.region_at(addr)
        result: ExternalAbort | None
        if region is None or not region.contains(addr, size):
            result = ExternalAbort(addr, "no region decodes this address")
        elif region.kind is RegionKind.RAM:
            self.ram.write_int(addr, size, value)
            result = None
        elif size not in _VALID_MMIO_SIZES or addr % size:
            result = ExternalAbort(addr, f"unsupported MMIO access size {size}")
        else:
            assert region.device is not None
            result = region.device.mmio_write(addr - region.base, size, value, initiator)
        if self.observers:
            self._notify(Access(initiator, addr, size, True, value, result is not None))
        return result

    def read_bytes(self, initiator: Initiator, addr: int, length: int) -> bytes | ExternalAbort:
        """A bulk RAM read (queue entries, STEs, DMA buffers); MMIO is not bulk-readable."""
        result: bytes | ExternalAbort
        if self.is_ram(addr, max(length, 1)):
            result = self.ram.read(addr, length)
        else:
            result = ExternalAbort(addr, "bulk read outside RAM")
        if self.observers:
            data = None if isinstance(result, ExternalAbort) else result
            self._notify(Access(initiator, addr, length, False, data, data is None))
        return result

    def write_bytes(self, initiator: Initiator, addr: int, data: bytes) -> ExternalAbort | None:
        result: ExternalAbort | None = None
        if self.is_ram(addr, max(len(data), 1)):
            self.ram.write(addr, data)
        else:
            result = ExternalAbort(addr, "bulk write outside RAM")
        if self.observers:
            self._notify(Access(initiator, addr, len(data), True, bytes(data), result is not None))
        return result

    def _notify(self, access: Access) -> None:
        for observer in self.observers:
            observer(access)
