"""How the page-table library reaches the memory its tables live in.

The hypervisor writes its tables directly (EL2); the host goes through its EL1 access path. Both
are a ``TableMemory``. ``BusTableMemory`` is the direct one, over the system bus.
"""

from __future__ import annotations

from typing import Protocol

from pkvm_smmu.machine.bus import ExternalAbort, Initiator, SystemBus
from pkvm_smmu.machine.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE

Buffer = bytes | bytearray | memoryview


class TableMemory(Protocol):
    """Physical memory as a table builder sees it. Descriptors are little-endian u64s."""

    def read_u64(self, pa: int) -> int: ...

    def write_u64(self, pa: int, value: int) -> None: ...

    def read_table(self, pa: int, length: int) -> bytes:
        """``length`` bytes of (part of) a table, for scans that would be slow entry by entry."""
        ...

    def write_table(self, pa: int, data: Buffer) -> None:
        """Bulk write of a whole or partial table."""
        ...

    def zero_page(self, pa: int, size: int = PAGE_SIZE) -> None: ...


class TableMemoryAbort(RuntimeError):
    """A table access aborted: the tables were placed in memory the accessor cannot reach.

    That is a fault of whoever set the table up (like a kernel data abort), not a value to return.
    """

    def __init__(self, abort: ExternalAbort) -> None:
        super().__init__(f"page-table access at {abort.address:#x} aborted: {abort.reason}")
        self.abort = abort


class BusTableMemory:
    """``TableMemory`` over a ``SystemBus`` for one initiator.

    With no bus observers, RAM is accessed directly (bulk writes go straight into the RAM pages);
    otherwise every access goes through the bus so observers see it.
    """

    __slots__ = ("bus", "initiator")

    def __init__(self, bus: SystemBus, initiator: Initiator) -> None:
        self.bus = bus
        self.initiator = initiator

    def read_u64(self, pa: int) -> int:
        bus = self.bus
        if not bus.observers and bus.is_ram(pa, 8):
            return bus.ram.read_int(pa, 8)
        value = bus.read(self.initiator, pa, 8)
        if isinstance(value, ExternalAbort):
            raise TableMemoryAbort(value)
        return value

    def write_u64(self, pa: int, value: int) -> None:
        bus = self.bus
        if not bus.observers and bus.is_ram(pa, 8):
            bus.ram.write_int(pa, 8, value)
            return
        abort = bus.write(self.initiator, pa, 8, value)
        if abort is not None:
            raise TableMemoryAbort(abort)

    def read_table(self, pa: int, length: int) -> bytes:
        bus = self.bus
        if not bus.observers and bus.is_ram(pa, length):
            return bus.ram.read(pa, length)
        data = bus.read_bytes(self.initiator, pa, length)
        if isinstance(data, ExternalAbort):
            raise TableMemoryAbort(data)
        return data

    def write_table(self, pa: int, data: Buffer) -> None:
        bus = self.bus
        view = memoryview(data).cast("B")
        length = len(view)
        if not bus.observers and bus.is_ram(pa, length):
            ram = bus.ram
            done = 0
            while done < length:
                offset = (pa + done) & PAGE_MASK
                chunk = min(length - done, PAGE_SIZE - offset)
                ram.page((pa + done) >> PAGE_SHIFT)[offset : offset + chunk] = view[done : done + chunk]
                done += chunk
            return
        abort = bus.write_bytes(self.initiator, pa, bytes(view))
        if abort is not None:
            raise TableMemoryAbort(abort)

    def zero_page(self, pa: int, size: int = PAGE_SIZE) -> None:
        bus = self.bus
        if not bus.observers and bus.is_ram(pa, size):
            bus.ram.zero(pa, size)  # releases whole RAM pages rather than writing zeros
            return
        abort = bus.write_bytes(self.initiator, pa, bytes(size))
        if abort is not None:
            raise TableMemoryAbort(abort)
