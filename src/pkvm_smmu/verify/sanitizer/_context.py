"""What every check needs from the running sanitizer: where in the run we are, RAM as it is (read
without making an access anyone observes), and where reports go."""

from __future__ import annotations

from typing import Protocol

from pkvm_smmu.machine.memory import Ram
from pkvm_smmu.verify.sanitizer._report import Coverage, Location, SanitizerReport


class RunContext(Protocol):
    @property
    def ram(self) -> Ram: ...

    @property
    def coverage(self) -> Coverage: ...

    def location(self, initiator: str, address: int, what: str = "") -> Location:
        """The current point of the run (after the last trace event delivered)."""
        ...

    def add(self, report: SanitizerReport) -> None: ...


def read_u64(ram: Ram, address: int) -> int:
    return ram.read_int(address, 8)


def read_entry(ram: Ram, address: int) -> int:
    """A 64-byte STE or CD as one little-endian 512-bit value."""
    return int.from_bytes(ram.read(address, 64), "little")


__all__ = ["RunContext", "read_entry", "read_u64"]
