"""Decoders for the bindings both the hardware and the kernel read: ID maps (``iommu-map``,
``msi-map``), PCI addresses and ``ranges``, and interrupt specifiers (``interrupts``,
``interrupt-map``).

They describe; they decide nothing. The platform builder wires hardware from them and the
kernel's firmware layer derives fwspecs from them, each for its own purpose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

from pkvm_smmu.devicetree._tree import Node, Property

# ---- ID maps (Documentation/devicetree/bindings/pci/pci-iommu.yaml, pci-msi.txt) ----------------


@dataclass(frozen=True, slots=True)
class IdMapEntry:
    """``(id-base, phandle, out-base, length)``: input IDs [id_base, id_base + length) map to
    [out_base, out_base + length) of ``target``."""

    id_base: int
    target: Node
    out_base: int
    length: int

    def contains(self, masked_id: int) -> bool:
        return self.id_base <= masked_id < self.id_base + self.length


@dataclass(frozen=True, slots=True)
class IdMap:
    """A decoded ``iommu-map``/``msi-map`` with its mask (all ones when absent)."""

    node: Node
    name: str
    mask: int
    entries: tuple[IdMapEntry, ...]

    def lookup(self, input_id: int) -> tuple[Node, int] | None:
        """The target and output ID for ``input_id`` (masked first), as Linux's ``of_map_id``;
        None when no entry covers it (the ID then has no IOMMU)."""
        masked = input_id & self.mask
        for entry in self.entries:
            if entry.contains(masked):
                return entry.target, (masked - entry.id_base + entry.out_base) & 0xFFFF_FFFF
        return None


def id_map(
    node: Node, map_name: str = "iommu-map", mask_name: str = "iommu-map-mask", cells_name: str | None = None
) -> IdMap | None:
    """Decode ``map_name`` of ``node``; None when absent. When ``cells_name`` is given, every target
    must declare it as 1 (an ID map's output specifier is one cell)."""
    prop = node.get(map_name)
    if prop is None:
        return None
    cells = prop.u32s()
    if not cells or len(cells) % 4:
        raise prop.error(
            f"{len(cells)} cells is not a whole number of 4-cell (id, phandle, out, length) entries"
        )
    mask_prop = node.get(mask_name)
    mask = mask_prop.u32() if mask_prop is not None else 0xFFFF_FFFF
    entries = []
    for at in range(0, len(cells), 4):
        id_base, phandle, out_base, length = cells[at : at + 4]
        if id_base & ~mask:
            raise prop.error(f"{mask_name} ({mask:#x}) ignores bits of id-base {id_base:#x}")
        target = node.tree.resolve_phandle(phandle, prop)
        if cells_name is not None:
            count = target.get(cells_name)
            if count is None:
                raise prop.error(f"target {target.path} has no {cells_name}")
            if count.u32() != 1:
                raise prop.error(
                    f"target {target.path} has {cells_name} = <{count.u32()}>, an ID map needs 1"
                )
        entries.append(IdMapEntry(id_base, target, out_base, length))
    return IdMap(node, map_name, mask, tuple(entries))


def iommu_map(node: Node) -> IdMap | None:
    return id_map(node, "iommu-map", "iommu-map-mask", "#iommu-cells")


def msi_map(node: Node) -> IdMap | None:
    return id_map(node, "msi-map", "msi-map-mask", None)


# ---- PCI ------------------------------------------------------------------------------------------

_BDF = re.compile(r"^(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$")


@dataclass(frozen=True, slots=True, order=True)
class Bdf:
    """A PCI bus/device/function; its requester ID is ``bus << 8 | device << 3 | function``."""

    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        if not (0 <= self.bus < 256 and 0 <= self.device < 32 and 0 <= self.function < 8):
            raise ValueError(f"bus {self.bus}, device {self.device}, function {self.function} out of range")

    @classmethod
    def parse(cls, text: str) -> Bdf:
        """``BB:DD.F`` in hexadecimal, as lspci and QEMU print it."""
        match = _BDF.match(text.strip())
        if match is None:
            raise ValueError(f"'{text}' is not a PCI address of the form BB:DD.F (hexadecimal)")
        return cls(int(match["bus"], 16), int(match["dev"], 16), int(match["fn"], 16))

    @classmethod
    def from_rid(cls, rid: int) -> Bdf:
        return cls((rid >> 8) & 0xFF, (rid >> 3) & 0x1F, rid & 7)

    @property
    def devfn(self) -> int:
        return self.device << 3 | self.function

    @property
    def rid(self) -> int:
        return self.bus << 8 | self.devfn

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.device:02x}.{self.function:x}"


class PciSpace(IntEnum):
    """phys.hi ss field of a PCI address (IEEE 1275 PCI binding)."""

    CONFIG = 0
    IO = 1
    MEM32 = 2
    MEM64 = 3


@dataclass(frozen=True, slots=True)
class PciRange:
    """A host bridge window: PCI bus addresses [pci_address, +size) appear at ``cpu_address``."""

    space: PciSpace
    prefetchable: bool
    pci_address: int
    cpu_address: int
    size: int

    def contains_cpu(self, address: int, length: int = 1) -> bool:
        return self.cpu_address <= address and address + length <= self.cpu_address + self.size


def pci_ranges(node: Node) -> tuple[PciRange, ...]:
    """The windows of a PCI host bridge from ``ranges`` (3-cell child addresses)."""
    ranges = node.ranges()
    if not ranges:
        return ()
    if node.address_cells != 3:
        raise node.error(f"a PCI bus needs #address-cells = <3>, found {node.address_cells}", "ranges")
    out = []
    for entry in ranges:
        phys_hi = entry.child_address >> 64
        cpu = node.parent.translate(entry.parent_address) if node.parent is not None else None
        if cpu is None:
            raise node.error(f"window at {entry.parent_address:#x} has no CPU address", "ranges")
        out.append(
            PciRange(
                PciSpace((phys_hi >> 24) & 3),
                bool(phys_hi >> 30 & 1),
                entry.child_address & ((1 << 64) - 1),
                cpu,
                entry.size,
            )
        )
    return tuple(out)


def pci_bus_range(node: Node) -> tuple[int, int]:
    """``bus-range``, or the buses the ECAM ``reg`` covers (1 MiB of config space per bus)."""
    prop = node.get("bus-range")
    if prop is not None:
        cells = prop.u32s()
        if len(cells) != 2 or cells[0] > cells[1] or cells[1] > 255:
            raise prop.error(f"expected <first last> with first <= last <= 255, found {list(cells)}")
        return cells[0], cells[1]
    regs = node.reg()
    buses = (regs[0].size >> 20) if regs else 1
    return 0, max(0, min(buses, 256) - 1)


def pci_unit_address(bdf: Bdf) -> tuple[int, int, int]:
    """The 3-cell config-space unit address of a function (phys.hi = bus/devfn, register 0)."""
    return (bdf.bus << 16 | bdf.devfn << 8, 0, 0)


# ---- interrupts ----------------------------------------------------------------------------------

_GIC_COMPATIBLES = (
    "arm,gic-v3",
    "arm,gic-400",
    "arm,cortex-a15-gic",
    "arm,cortex-a9-gic",
    "arm,cortex-a7-gic",
    "arm,arm11mp-gic",
    "arm,gic-v2",
)


def is_gic(node: Node) -> bool:
    return node.is_compatible(*_GIC_COMPATIBLES)


@dataclass(frozen=True, slots=True)
class InterruptSpec:
    """One interrupt: its controller, specifier cells and ``interrupt-names`` entry."""

    controller: Node
    cells: tuple[int, ...]
    name: str | None = None

    @property
    def intid(self) -> int | None:
        """The GIC INTID of a GIC specifier (SPI, PPI, extended SPI/PPI); None for other controllers."""
        if not is_gic(self.controller) or len(self.cells) < 2:
            return None
        kind, number = self.cells[0], self.cells[1]
        base = {0: 32, 1: 16, 2: 4096, 3: 1056}.get(kind)
        return None if base is None else base + number

    @property
    def line(self) -> str:
        """The name of the wire this interrupt arrives on. The platform pulses, and the kernel
        listens on, exactly this name: ``intid:<n>`` for a GIC, controller path and cells otherwise."""
        intid = self.intid
        if intid is not None:
            return f"intid:{intid}"
        return f"{self.controller.path}:" + ",".join(f"{c:#x}" for c in self.cells)


def interrupt_parent(node: Node) -> Node | None:
    """The controller ``interrupts`` of ``node`` refers to (Linux's of_irq_find_parent)."""
    current: Node | None = node
    seen: set[str] = set()
    while current is not None and current.path not in seen:  # a loop of parents finds nothing
        seen.add(current.path)
        prop = current.get("interrupt-parent")
        nxt = prop.phandle() if prop is not None else current.parent
        if nxt is None:
            return None
        if nxt.has("#interrupt-cells"):
            return nxt
        current = nxt
    return None


def interrupts(node: Node) -> tuple[InterruptSpec, ...]:
    """``interrupts-extended``, else ``interrupts`` with the interrupt parent's cells, named by
    ``interrupt-names``."""
    names_prop = node.get("interrupt-names")
    names = names_prop.strings() if names_prop is not None else ()
    specs: list[tuple[Node, tuple[int, ...]]] = []
    extended = node.get("interrupts-extended")
    if extended is not None:
        specs = [(entry.target, entry.args) for entry in extended.phandle_args("#interrupt-cells")]
    else:
        prop = node.get("interrupts")
        if prop is None:
            return ()
        parent = interrupt_parent(node)
        if parent is None:
            raise prop.error("no interrupt parent (no 'interrupt-parent' on the node or its ancestors)")
        count = parent.u32("#interrupt-cells")
        specs = [(parent, cells) for cells in _split(prop, count)]
    if len(names) > len(specs):
        raise node.error(f"{len(names)} names for {len(specs)} interrupts", "interrupt-names")
    return tuple(
        InterruptSpec(controller, cells, names[i] if i < len(names) else None)
        for i, (controller, cells) in enumerate(specs)
    )


def _split(prop: Property, width: int) -> list[tuple[int, ...]]:
    cells = prop.u32s()
    if width <= 0 or len(cells) % width:
        raise prop.error(f"{len(cells)} cells is not a whole number of {width}-cell specifiers")
    return [tuple(cells[i : i + width]) for i in range(0, len(cells), width)]


def map_interrupt(node: Node, unit: tuple[int, ...], spec: tuple[int, ...]) -> InterruptSpec | None:
    """Resolve a child's (unit address, interrupt specifier) through ``node``'s ``interrupt-map``
    and ``interrupt-map-mask`` (the PCI INTx routing of a host bridge). None when nothing matches."""
    prop = node.get("interrupt-map")
    if prop is None:
        return None
    child_ac, child_ic = node.address_cells, node.u32("#interrupt-cells")
    if len(unit) != child_ac or len(spec) != child_ic:
        raise prop.error(f"lookup needs {child_ac} address and {child_ic} interrupt cells")
    mask_prop = node.get("interrupt-map-mask")
    mask = mask_prop.u32s() if mask_prop is not None else (0xFFFF_FFFF,) * (child_ac + child_ic)
    if len(mask) != child_ac + child_ic:
        raise node.error(f"expected {child_ac + child_ic} cells", "interrupt-map-mask")
    key = tuple(v & m for v, m in zip((*unit, *spec), mask, strict=True))
    cells = prop.u32s()
    at = 0
    while at < len(cells):
        child = cells[at : at + child_ac + child_ic]
        at += child_ac + child_ic
        if at >= len(cells):
            raise prop.error("truncated entry")
        parent = node.tree.resolve_phandle(cells[at], prop)
        at += 1
        parent_ac = parent.u32("#address-cells", 0)
        parent_ic = parent.u32("#interrupt-cells")
        parent_spec = cells[at + parent_ac : at + parent_ac + parent_ic]
        at += parent_ac + parent_ic
        if at > len(cells):
            raise prop.error("truncated entry")
        if tuple(v & m for v, m in zip(child, mask, strict=True)) == key:
            return InterruptSpec(parent, tuple(parent_spec))
    return None
