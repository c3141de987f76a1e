"""The host kernel's interrupt layer (``kernel/irq``): Linux IRQ numbers, handlers, and platform MSI.

Firmware names an interrupt by the wire it arrives on (``Resource.line``, e.g. ``intid:106``);
``irq_create_of_mapping`` gives it a Linux IRQ number, which is what ``platform_get_irq`` and
``request_irq`` deal in. An MSI domain (one per ``msi-controller`` node: a GICv3 ITS or a GICv2m
frame) hands out (doorbell PA, payload) pairs, each with its own IRQ number.

The host never touches the interrupt controller model. Whoever wires the platform installs an
irqchip hook (``set_irqchip``): it is told about every mapping, existing and future, and calls
``generic_handle_irq`` when that wire is pulsed or that MSI lands.

Model choice: the doorbell sees only the MSI payload (no ITS DeviceID sideband), so event IDs are
unique per MSI controller rather than per DeviceID.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pkvm_smmu.trace import TraceBus

COMPONENT = "host.irq"
GITS_TRANSLATER = 0x1_0040  # in the ITS's second 64 KiB frame
V2M_MSI_SETSPI_NS = 0x40

IrqHandler = Callable[[], bool]  # returns True when the device had something to say (IRQ_HANDLED)


@dataclass(frozen=True)
class IrqMapping:
    """One Linux IRQ and what it stands for: a wired line, or an MSI (doorbell + payload)."""

    irq: int
    hwirq: str  # the firmware's line name, or "msi:<doorbell>:<data>"
    msi_address: int | None = None
    msi_data: int | None = None

    @property
    def is_msi(self) -> bool:
        return self.msi_address is not None


@dataclass(frozen=True)
class MsiMsg:
    """``struct msi_msg`` plus the IRQ it raises."""

    irq: int
    address: int
    data: int


@dataclass
class IrqAction:
    handler: IrqHandler
    name: str
    dev_id: Any
    shared: bool = False


@dataclass
class IrqDesc:
    """``struct irq_desc``: the mapping, its actions (several when shared) and its counts."""

    mapping: IrqMapping
    actions: list[IrqAction] = field(default_factory=list)
    count: int = 0  # interrupts delivered while requested
    unhandled: int = 0  # delivered, but no action said IRQ_HANDLED


class MsiDomain:
    """Platform MSI through one MSI controller: a fixed doorbell and payloads from a counter."""

    def __init__(self, irqs: HostIrq, name: str, doorbell: int, first_data: int = 0) -> None:
        self.irqs = irqs
        self.name = name
        self.doorbell = doorbell
        self.next_data = first_data
        self.allocated: list[tuple[str, MsiMsg]] = []  # (owner, message), in allocation order

    def alloc(self, owner: str) -> MsiMsg:
        """One MSI for ``owner`` (a device name and index, for the trace)."""
        data = self.next_data
        self.next_data += 1
        mapping = self.irqs._map(f"msi:{self.doorbell:#x}:{data:#x}", self.doorbell, data)
        msg = MsiMsg(mapping.irq, self.doorbell, data)
        self.allocated.append((owner, msg))
        self.irqs._emit("msi.alloc", owner=owner, domain=self.name, irq=msg.irq, address=msg.address,
                        data=msg.data)  # fmt: skip
        return msg


class HostIrq:
    """One kernel's IRQ numbers and handlers. IRQ 0 is never handed out (it means "none")."""

    def __init__(self, trace: TraceBus | None = None) -> None:
        self.trace = trace if trace is not None else TraceBus()
        self.descs: dict[int, IrqDesc] = {}
        self._by_hwirq: dict[str, int] = {}
        self._next_irq = 1
        self._irqchip: Callable[[IrqMapping], None] | None = None
        self.msi_domains: dict[Any, MsiDomain] = {}  # by the MSI controller's fwnode

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(COMPONENT, kind, **fields)

    # -- the platform's side ---------------------------------------------------------------------
    def set_irqchip(self, hook: Callable[[IrqMapping], None]) -> None:
        """Install the platform wiring; it hears of every mapping, those made so far first."""
        self._irqchip = hook
        for desc in list(self.descs.values()):
            hook(desc.mapping)

    def _map(self, hwirq: str, msi_address: int | None = None, msi_data: int | None = None) -> IrqMapping:
        irq = self._by_hwirq.get(hwirq)
        if irq is not None:
            return self.descs[irq].mapping
        irq = self._next_irq
        self._next_irq += 1
        mapping = IrqMapping(irq, hwirq, msi_address, msi_data)
        self.descs[irq] = IrqDesc(mapping)
        self._by_hwirq[hwirq] = irq
        self._emit("map", irq=irq, hwirq=hwirq)
        if self._irqchip is not None:
            self._irqchip(mapping)
        return mapping

    # -- mappings ----------------------------------------------------------------------------------
    def irq_create_mapping(self, line: str) -> int:
        """The Linux IRQ for a wired line (the same number every time)."""
        return self._map(line).irq

    def irq_create_of_mapping(self, resource: Any) -> int:
        """``irq_of_parse_and_map`` for a firmware IRQ resource (its ``line``); 0 without one."""
        line = getattr(resource, "line", None)
        return self.irq_create_mapping(line) if isinstance(line, str) and line else 0

    def irq_find_mapping(self, hwirq: str) -> int:
        return self._by_hwirq.get(hwirq, 0)

    def mapping(self, irq: int) -> IrqMapping | None:
        desc = self.descs.get(irq)
        return desc.mapping if desc is not None else None

    def add_msi_domain(self, fwnode: Any, name: str, doorbell: int, first_data: int = 0) -> MsiDomain:
        domain = self.msi_domains.get(fwnode)
        if domain is None:
            domain = self.msi_domains[fwnode] = MsiDomain(self, name, doorbell, first_data)
            self._emit("msi.domain", domain=name, doorbell=doorbell)
        return domain

    def msi_domain(self, fwnode: Any) -> MsiDomain | None:
        return self.msi_domains.get(fwnode)

    # -- drivers' side -----------------------------------------------------------------------------
    def request_irq(
        self, irq: int, handler: IrqHandler, name: str, dev_id: Any = None, *, shared: bool = False
    ) -> int:
        """Install ``handler`` on ``irq``. A line already in use takes another action only when
        both asked for sharing (IRQF_SHARED). 0 or -errno."""
        desc = self.descs.get(irq)
        if desc is None:
            self._emit("request_irq", irq=irq, name=name, result=-errno.EINVAL)
            return -errno.EINVAL
        if shared and dev_id is None:
            self._emit("request_irq", irq=irq, name=name, result=-errno.EINVAL)
            return -errno.EINVAL  # a shared handler must say which device it is
        if desc.actions and not (shared and all(a.shared for a in desc.actions)):
            self._emit("request_irq", irq=irq, name=name, result=-errno.EBUSY)
            return -errno.EBUSY
        desc.actions.append(IrqAction(handler, name, dev_id, shared))
        self._emit("request_irq", irq=irq, name=name, hwirq=desc.mapping.hwirq, result=0)
        return 0

    def free_irq(self, irq: int, dev_id: Any = None) -> None:
        desc = self.descs.get(irq)
        if desc is None:
            return
        for action in desc.actions:
            if action.dev_id is dev_id:
                desc.actions.remove(action)
                self._emit("free_irq", irq=irq, name=action.name)
                return

    def generic_handle_irq(self, irq: int) -> bool:
        """Run the actions of ``irq``; True if one handled it. A line nobody requested stays
        masked at the interrupt controller: nothing runs and nothing is counted."""
        desc = self.descs.get(irq)
        if desc is None or not desc.actions:
            return False
        desc.count += 1
        handled = False
        for action in tuple(desc.actions):
            handled = bool(action.handler()) or handled
        if not handled:
            desc.unhandled += 1
        self._emit("irq", irq=irq, name=desc.actions[0].name if desc.actions else None, handled=handled)
        return handled

    def irq_counts(self) -> dict[int, int]:
        """``/proc/interrupts``: deliveries per requested IRQ."""
        return {irq: desc.count for irq, desc in self.descs.items() if desc.actions}


__all__ = [
    "GITS_TRANSLATER",
    "V2M_MSI_SETSPI_NS",
    "HostIrq",
    "IrqAction",
    "IrqDesc",
    "IrqHandler",
    "IrqMapping",
    "MsiDomain",
    "MsiMsg",
]
