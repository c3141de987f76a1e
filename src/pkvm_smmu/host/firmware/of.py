"""The kernel's reading of a device tree (the ``of`` core): fwnodes, memory, resources.

``Firmware`` wraps a loaded ``DeviceTree`` and answers what Linux's OF code answers: which RAM
there is, which platform devices ``of_platform_populate`` creates and with which resources, which
IOMMU and IDs a device's DMA goes through (``of_iommu``), and what each node depends on
(fw_devlink). It only describes: the driver core and the IOMMU core decide what to do with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pkvm_smmu.devicetree import (
    DeviceTree,
    InterruptSpec,
    Node,
    RegEntry,
    interrupts,
)
from pkvm_smmu.host.firmware.fwnode import FwNode


class ResourceType(Enum):
    MEM = "mem"
    IRQ = "irq"


# GIC specifier trigger flags (include/dt-bindings/interrupt-controller/irq.h).
IRQ_TYPE_EDGE_RISING = 1
IRQ_TYPE_EDGE_FALLING = 2
IRQ_TYPE_LEVEL_HIGH = 4
IRQ_TYPE_LEVEL_LOW = 8


@dataclass(frozen=True)
class Resource:
    """``struct resource``: a MEM range [start, start + size) or an IRQ.

    For an IRQ, ``start`` is the GIC INTID when there is one (else -1), ``line`` the name of the
    wire it arrives on (what the kernel listens to), ``flags`` the trigger type cell.
    """

    type: ResourceType
    start: int
    size: int = 0
    name: str | None = None
    line: str | None = None
    flags: int = 0

    @property
    def end(self) -> int:
        """Inclusive end, as Linux prints it."""
        return self.start + self.size - 1


def mem_resource(region: RegEntry, name: str | None = None) -> Resource:
    return Resource(ResourceType.MEM, region.address, region.size, name)


def irq_resource(spec: InterruptSpec) -> Resource:
    intid = spec.intid
    flags = spec.cells[2] if intid is not None and len(spec.cells) > 2 else 0
    return Resource(ResourceType.IRQ, intid if intid is not None else -1, 1, spec.name, spec.line, flags)


@dataclass(frozen=True)
class MemoryRegion:
    base: int
    size: int
    fwnode: FwNode


class Firmware:
    """One device tree as the kernel sees it."""

    def __init__(self, tree: DeviceTree) -> None:
        self.tree = tree
        self._fwnodes: dict[str, FwNode] = {}

    def __repr__(self) -> str:
        return f"Firmware({self.tree.source})"

    # -- fwnodes -----------------------------------------------------------------------------------
    def fwnode(self, node: Node | str) -> FwNode:
        """The handle for a node (or a node path / ``&label``); the same object every time."""
        found = self.tree.node(node) if isinstance(node, str) else node
        handle = self._fwnodes.get(found.path)
        if handle is None:
            handle = self._fwnodes[found.path] = FwNode(found.path, found.name, found.compatible)
        return handle

    def node(self, fwnode: FwNode) -> Node:
        return self.tree.node(fwnode.path)

    def resources(self, node: Node) -> tuple[Resource, ...]:
        """MEM resources from ``reg`` (CPU addresses), then IRQ resources from the interrupts,
        as ``of_device_alloc`` orders them. A ``reg`` that does not translate gives none."""
        regs = node.translated_reg() or ()
        names_prop = node.get("reg-names")
        names = names_prop.strings() if names_prop is not None else ()
        mem = [mem_resource(r, names[i] if i < len(names) else None) for i, r in enumerate(regs)]
        return (*mem, *(irq_resource(spec) for spec in interrupts(node)))

    # -- memory ------------------------------------------------------------------------------------
    def memory(self) -> tuple[MemoryRegion, ...]:
        """RAM from the ``memory`` nodes (``device_type = "memory"``), in address order."""
        out = []
        for node in self.tree.nodes():
            if node.device_type == "memory" and node.available:
                handle = self.fwnode(node)
                out += [MemoryRegion(r.address, r.size, handle) for r in node.mmio() if r.size]
        return tuple(sorted(out, key=lambda m: m.base))

    def reserved_memory(self) -> tuple[tuple[int, int], ...]:
        """``/memreserve/`` entries and ``/reserved-memory`` children with a ``reg``."""
        out = list(self.tree.memreserves)
        reserved = self.tree.root.child("reserved-memory")
        for child in reserved.children if reserved is not None else ():
            out += [(r.address, r.size) for r in child.translated_reg() or ()]
        return tuple(sorted(out))
