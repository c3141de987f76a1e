"""The driver's accessors for the CPU port: ``readl_relaxed``/``writeq_relaxed`` on the SMMU's
registers, coherent-memory loads and stores, and polling on the modeled clock.

A CPU access that does not complete (the port returns a fault object, e.g. a stage-2 fault under
pKVM) raises ``HwFault`` inside the driver; every entry point the kernel calls catches it and
returns an error code (``-EIO``) instead, the way a kernel's exception fixup would.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from pkvm_smmu.host.hw import Cpu, is_fault


class HwFault(Exception):
    """A CPU access to the SMMU or to memory did not complete."""

    def __init__(self, address: int, what: str, result: object) -> None:
        super().__init__(f"{what} at {address:#x} faulted: {result!r}")
        self.address = address
        self.what = what
        self.result = result


class Mmio:
    """Register and memory accesses through one CPU port."""

    def __init__(self, cpu: Cpu) -> None:
        self.cpu = cpu

    # -- registers (relaxed accessors: the model's CPU port is in order) ---------------------------
    def readl(self, address: int) -> int:
        value = self.cpu.read(address, 4)
        if is_fault(value) or value is None:
            raise HwFault(address, "readl", value)
        return int(value)

    def readq(self, address: int) -> int:
        value = self.cpu.read(address, 8)
        if is_fault(value) or value is None:
            raise HwFault(address, "readq", value)
        return int(value)

    def writel(self, value: int, address: int) -> None:
        result = self.cpu.write(address, 4, value & 0xFFFF_FFFF)
        if result is not None:
            raise HwFault(address, "writel", result)

    def writeq(self, value: int, address: int) -> None:
        result = self.cpu.write(address, 8, value & 0xFFFF_FFFF_FFFF_FFFF)
        if result is not None:
            raise HwFault(address, "writeq", result)

    # -- coherent memory (queues, stream table, CD tables) --------------------------------------
    def read_mem(self, address: int, length: int) -> bytes:
        data = self.cpu.read_bytes(address, length)
        if not isinstance(data, bytes):
            raise HwFault(address, "memory read", data)
        return data

    def write_mem(self, address: int, data: bytes) -> None:
        result = self.cpu.write_bytes(address, data)
        if result is not None:
            raise HwFault(address, "memory write", result)

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read_mem(address, 8), "little")

    def write_u64(self, address: int, value: int) -> None:
        """WRITE_ONCE of one little-endian u64: a single-copy-atomic store."""
        result = self.cpu.write(address, 8, value & 0xFFFF_FFFF_FFFF_FFFF)
        if result is not None:
            raise HwFault(address, "WRITE_ONCE", result)

    def read_u32(self, address: int) -> int:
        value = self.cpu.read(address, 4)
        if is_fault(value) or value is None:
            raise HwFault(address, "memory read", value)
        return int(value)

    # -- time ---------------------------------------------------------------------------------
    def now_us(self) -> float:
        return self.cpu.now_us()

    def udelay(self, us: float) -> None:
        self.cpu.udelay(us)

    def poll_timeout(
        self, condition: Callable[[], bool], timeout_us: float, max_delay_us: float = 64.0
    ) -> int:
        """``readx_poll_timeout``: 0 once ``condition()`` holds, ``-ETIMEDOUT`` after ``timeout_us``
        of modeled time. Sleeps back off exponentially (1, 2, 4 ... ``max_delay_us``); polls that
        could only read what the previous one read are skipped (``Clock.poll_backoff``)."""
        if self.cpu.poll_backoff(condition, timeout_us, 1.0, max_delay_us):
            return 0
        return 0 if condition() else -errno.ETIMEDOUT


P = ParamSpec("P")
R = TypeVar("R")


def fault_to_errno(default: Any = -errno.EIO) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn a ``HwFault`` escaping a kernel entry point into ``default`` (logged by the caller's
    ``on_fault`` hook when the object has one)."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except HwFault as fault:
                owner = args[0] if args else None
                hook = getattr(owner, "on_fault", None)
                if callable(hook):
                    hook(fn.__name__, fault)
                return default

        return wrapper

    return decorate


__all__ = ["HwFault", "Mmio", "fault_to_errno"]
