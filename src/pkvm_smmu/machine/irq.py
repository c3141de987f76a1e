"""Interrupt delivery: named edge-triggered wired lines, and an MSI doorbell on the bus.

A wired output (an SMMU's GERROR line, a device's completion line) is a named line that is pulsed.
An MSI is a 32-bit write to a doorbell register; the ``MsiDoorbell`` models a GICv3 ITS translation
page (GITS_TRANSLATER at +0x40), so a write of DATA raises the interrupt named ``msi_line(DATA)``.
MSIs aimed at RAM are legal too: they are ordinary writes that software may poll.
"""

from __future__ import annotations

from collections.abc import Callable

from pkvm_smmu.machine.bus import ExternalAbort, Initiator, Region, SystemBus
from pkvm_smmu.trace.bus import TraceBus

Handler = Callable[[str], None]


def msi_line(data: int) -> str:
    """The line an MSI with payload ``data`` raises through a doorbell."""
    return f"msi:{data:#x}"


class InterruptController:
    """Named edge-triggered lines with per-line pulse counts and any number of handlers each."""

    def __init__(self, trace: TraceBus | None = None, name: str = "gic") -> None:
        self.name = name
        self.trace = trace if trace is not None else TraceBus()
        self._handlers: dict[str, list[Handler]] = {}
        self._counts: dict[str, int] = {}

    def connect(self, line: str, handler: Handler) -> None:
        """Call ``handler(line)`` on every pulse of ``line``."""
        self._handlers.setdefault(line, []).append(handler)

    def disconnect(self, line: str, handler: Handler) -> None:
        handlers = self._handlers.get(line, [])
        if handler in handlers:
            handlers.remove(handler)

    def pulse(self, line: str) -> None:
        self._counts[line] = self._counts.get(line, 0) + 1
        if self.trace.enabled:
            self.trace.emit(self.name, "irq", line=line)
        for handler in tuple(self._handlers.get(line, ())):
            handler(line)

    def count(self, line: str) -> int:
        return self._counts.get(line, 0)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)


class MsiDoorbell:
    """An ITS-translation-page-like MMIO device: a 16- or 32-bit write to TRANSLATER raises an MSI."""

    TRANSLATER = 0x40
    SIZE = 0x10000

    def __init__(self, controller: InterruptController, name: str = "its") -> None:
        self.controller = controller
        self.name = name
        self.received: list[tuple[str, int]] = []  # (initiator, data), in arrival order

    def map(self, bus: SystemBus, base: int) -> Region:
        return bus.add_mmio(base, self.SIZE, self, self.name)

    def mmio_read(self, offset: int, size: int, initiator: Initiator) -> int | ExternalAbort:
        return 0  # the translation page has nothing to read

    def mmio_write(self, offset: int, size: int, value: int, initiator: Initiator) -> ExternalAbort | None:
        if offset == self.TRANSLATER and size in (2, 4):
            data = value & ((1 << (8 * size)) - 1)
            self.received.append((str(initiator), data))
            self.controller.pulse(msi_line(data))
        return None  # other offsets and sizes are write-ignored
