"""A CPU's access path to the machine at a given exception level.

The host kernel reaches the hardware only through an EL1 ``CpuPort``: every load and store it
makes passes the port's ``stage2`` check first (installed by the hypervisor once it deprivileges
the host), so a store to a donated MMIO page traps to the hypervisor instead of reaching the
device, and a store to a page the host no longer owns faults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pkvm_smmu.machine.bus import ExternalAbort, Initiator, SystemBus
from pkvm_smmu.machine.clock import Clock


@dataclass(frozen=True, slots=True)
class CpuFault:
    """An access the CPU could not complete (a stage-2 fault the hypervisor did not handle, or an
    external abort). The host kernel would take an exception; the model returns this value."""

    address: int
    is_write: bool
    reason: str


class Stage2Hook(Protocol):
    """The hypervisor's view of a host access: complete it, emulate it, or refuse it.

    ``handle`` returns None to let the access proceed to the bus unchanged, an int as the value of
    an emulated read (or 0 for an emulated write), or a ``CpuFault``.
    """

    def handle(self, address: int, size: int, is_write: bool, value: int) -> int | CpuFault | None: ...

    def allows_bulk(self, address: int, length: int, is_write: bool) -> bool: ...


class CpuPort:
    """Loads, stores and time as seen by software running on a CPU."""

    def __init__(self, bus: SystemBus, clock: Clock, initiator: Initiator) -> None:
        self.bus = bus
        self.clock = clock
        self.initiator = initiator
        self.stage2: Stage2Hook | None = None
        # Modeled cost of a CPU access, so polling loops let time pass.
        self.access_ns = 10

    def read(self, address: int, size: int) -> int | CpuFault:
        self.clock.advance(self.access_ns)
        if self.stage2 is not None:
            handled = self.stage2.handle(address, size, False, 0)
            if handled is not None:
                return handled
        value = self.bus.read(self.initiator, address, size)
        if isinstance(value, ExternalAbort):
            return CpuFault(address, False, value.reason)
        return value

    def write(self, address: int, size: int, value: int) -> CpuFault | None:
        self.clock.advance(self.access_ns)
        if self.stage2 is not None:
            handled = self.stage2.handle(address, size, True, value)
            if isinstance(handled, CpuFault):
                return handled
            if handled is not None:
                return None
        err = self.bus.write(self.initiator, address, size, value)
        return CpuFault(address, True, err.reason) if err is not None else None

    def read_bytes(self, address: int, length: int) -> bytes | CpuFault:
        if self.stage2 is not None and not self.stage2.allows_bulk(address, length, False):
            return CpuFault(address, False, "stage-2 permission fault")
        data = self.bus.read_bytes(self.initiator, address, length)
        if isinstance(data, ExternalAbort):
            return CpuFault(address, False, data.reason)
        return data

    def write_bytes(self, address: int, data: bytes) -> CpuFault | None:
        if self.stage2 is not None and not self.stage2.allows_bulk(address, len(data), True):
            return CpuFault(address, True, "stage-2 permission fault")
        err = self.bus.write_bytes(self.initiator, address, data)
        return CpuFault(address, True, err.reason) if err is not None else None

    # -- time --------------------------------------------------------------------------------------
    def now_us(self) -> float:
        return self.clock.now_us

    def udelay(self, us: float) -> None:
        self.clock.advance(int(us * 1000))

    def poll(self, condition: Callable[[], bool], timeout_us: float, step_us: float = 1.0) -> bool:
        return self.clock.poll(condition, timeout_us, max(1, int(step_us * 1000)))

    def poll_backoff(
        self, condition: Callable[[], bool], timeout_us: float, first_step_us: float, max_step_us: float
    ) -> bool:
        deadline = self.clock.now_ns + round(timeout_us * 1000)
        first = max(1, round(first_step_us * 1000))
        return self.clock.poll_backoff(condition, deadline, first, max(first, round(max_step_us * 1000)))
