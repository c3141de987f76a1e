"""What the host kernel knows of the hardware: a CPU port (loads, stores, time) and nothing else.

The host never imports the machine. It is handed an object with this shape (in the model, a
``machine.cpu.CpuPort`` at EL1); results that are not ints/bytes/None are faults it must handle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Cpu(Protocol):
    def read(self, address: int, size: int) -> Any: ...

    def write(self, address: int, size: int, value: int) -> Any: ...

    def read_bytes(self, address: int, length: int) -> Any: ...

    def write_bytes(self, address: int, data: bytes) -> Any: ...

    def now_us(self) -> float: ...

    def udelay(self, us: float) -> None: ...

    def poll(self, condition: Callable[[], bool], timeout_us: float, step_us: float = 1.0) -> bool: ...

    def poll_backoff(
        self, condition: Callable[[], bool], timeout_us: float, first_step_us: float, max_step_us: float
    ) -> bool:
        """A polling loop whose sleeps double from ``first_step_us`` up to ``max_step_us``."""
        ...


class Hvc(Protocol):
    """The hypervisor call instruction as the host kernel sees it: a named pKVM host hypercall with
    register arguments; the result is 0, a positive value (e.g. a VM handle) or a negative errno."""

    def hvc(self, name: str, *args: int) -> int: ...


def is_fault(result: object) -> bool:
    """True when a CPU access did not complete (the port returns a fault object, not a value)."""
    return not isinstance(result, int | bytes | type(None))
