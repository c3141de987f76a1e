"""``of_platform_populate``: the platform devices a device tree gives rise to, as descriptions.

Rules followed (drivers/of/platform.c): children of the root and, recursively, of nodes matching
the default bus table (``simple-bus``, ``simple-mfd``, ``isa``, ``arm,amba-bus``) become devices
when they have ``compatible`` and are available (``status`` okay). ``arm,primecell`` nodes go on
the AMBA bus. Interrupt controllers are left out: Linux brings them up early (IRQCHIP_DECLARE)
and marks them populated, so no platform device stands for them. Device names follow
``of_device_make_bus_id``: ``<translated reg address>.<node name>``, else the node names joined
by ``:`` up to an ancestor with an address.

On top of the generic descriptions, SMMUv3 nodes and PCIe ECAM host bridges are decoded into
what their drivers read at probe.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkvm_smmu.devicetree import (
    PCI_ECAM,
    SMMU_V3,
    Bdf,
    Node,
    PciRange,
    map_interrupt,
    pci_bus_range,
    pci_ranges,
    pci_unit_address,
)
from pkvm_smmu.host.firmware.fwnode import FwNode
from pkvm_smmu.host.firmware.of import Firmware, Resource, ResourceType, irq_resource

DEFAULT_BUS_MATCHES = ("simple-bus", "simple-mfd", "isa", "arm,amba-bus")
AMBA_PRIMECELL = "arm,primecell"

# arm-smmu-v3 DT quirk properties (arm_smmu_device_dt_probe / parse_driver_options).
SMMU_DT_OPTIONS = ("hisilicon,broken-prefetch-cmd", "cavium,cn9900-broken-page1-regspace")


@dataclass(frozen=True)
class PlatformDeviceDesc:
    """What ``of_platform_device_create`` would make: a device for ``fwnode`` with its resources."""

    fwnode: FwNode
    name: str  # dev_name()
    compatible: tuple[str, ...]
    resources: tuple[Resource, ...]
    dma_coherent: bool
    parent: FwNode | None  # the bus node it was populated under (None: the root)
    bus: str = "platform"  # "amba" for arm,primecell

    def mem(self, index: int = 0) -> Resource | None:
        mem = [r for r in self.resources if r.type is ResourceType.MEM]
        return mem[index] if index < len(mem) else None

    def irqs(self) -> tuple[Resource, ...]:
        return tuple(r for r in self.resources if r.type is ResourceType.IRQ)

    def irq_byname(self, name: str) -> Resource | None:
        return next((r for r in self.irqs() if r.name == name), None)


@dataclass(frozen=True)
class SmmuDesc:
    """An ``arm,smmu-v3`` node as its driver reads it at probe."""

    fwnode: FwNode
    base: int
    size: int
    irqs: dict[str, Resource]  # by interrupt-names: eventq, priq, cmdq-sync, gerror, combined
    dma_coherent: bool
    msi_parent: FwNode | None
    msi_device_id: int | None
    options: frozenset[str]  # SMMU_DT_OPTIONS present on the node


@dataclass(frozen=True)
class PciHostBridgeDesc:
    """A ``pci-host-ecam-generic`` node: ECAM window, buses, windows and the maps its children use."""

    fwnode: FwNode
    ecam_base: int
    ecam_size: int
    bus_range: tuple[int, int]
    windows: tuple[PciRange, ...]
    domain: int | None  # linux,pci-domain
    dma_coherent: bool
    has_iommu_map: bool
    msi_parent: FwNode | None  # msi-parent, or the target of msi-map's first entry

    def ecam_offset(self, bdf: Bdf, register: int = 0) -> int:
        """Offset of a function's config register within the ECAM window."""
        return (bdf.bus - self.bus_range[0]) << 20 | bdf.devfn << 12 | register


def device_name(fw: Firmware, node: Node) -> str:
    """``of_device_make_bus_id``."""
    parts: list[str] = []
    current: Node | None = node
    while current is not None and current.parent is not None:
        regs = current.translated_reg() if current.has("reg") else None
        if regs:
            mask = current.get("mask")
            unit = f"{regs[0].address:x}"
            if mask is not None:
                value = mask.u32()
                unit += f".{(value & -value).bit_length() - 1:x}"
            return ":".join([f"{unit}.{current.node_name}", *parts])
        parts.insert(0, current.name)
        current = current.parent
    return ":".join(parts)


def of_platform_populate(fw: Firmware) -> tuple[PlatformDeviceDesc, ...]:
    out: list[PlatformDeviceDesc] = []
    _populate_bus(fw, fw.tree.root, None, out)
    return tuple(out)


def _populate_bus(fw: Firmware, bus: Node, parent: FwNode | None, out: list[PlatformDeviceDesc]) -> None:
    for child in bus.children:
        if not child.has("compatible") or not child.available:
            continue
        if child.has("interrupt-controller"):
            continue
        out.append(
            PlatformDeviceDesc(
                fw.fwnode(child),
                device_name(fw, child),
                child.compatible,
                fw.resources(child),
                is_dma_coherent(child),
                parent,
                "amba" if child.is_compatible(AMBA_PRIMECELL) else "platform",
            )
        )
        if child.is_compatible(*DEFAULT_BUS_MATCHES):
            _populate_bus(fw, child, fw.fwnode(child), out)


def is_dma_coherent(node: Node) -> bool:
    """``of_dma_is_coherent``: ``dma-coherent`` on the node or an ancestor bus."""
    current: Node | None = node
    while current is not None:
        if current.has("dma-coherent"):
            return True
        if current.has("dma-noncoherent"):
            return False
        current = current.parent
    return False


def _msi_parent(fw: Firmware, node: Node) -> tuple[FwNode | None, int | None]:
    prop = node.get("msi-parent")
    if prop is None:
        return None, None
    if len(prop.u32s()) == 1:
        return fw.fwnode(prop.phandle()), None
    entry = prop.phandle_args("#msi-cells", default_cells=0)[0]
    return fw.fwnode(entry.target), (entry.args[0] if entry.args else None)


def smmu_descs(fw: Firmware) -> tuple[SmmuDesc, ...]:
    out = []
    for node in fw.tree.compatible_nodes(SMMU_V3):
        region = node.mmio()[0]
        irqs = {r.name: r for r in fw.resources(node) if r.type is ResourceType.IRQ and r.name}
        msi_parent, device_id = _msi_parent(fw, node)
        options = frozenset(o for o in SMMU_DT_OPTIONS if node.has(o))
        out.append(SmmuDesc(fw.fwnode(node), region.address, region.size, irqs, is_dma_coherent(node),
                            msi_parent, device_id, options))  # fmt: skip
    return tuple(out)


def pci_host_bridge_descs(fw: Firmware) -> tuple[PciHostBridgeDesc, ...]:
    out = []
    for node in fw.tree.compatible_nodes(PCI_ECAM):
        ecam = node.mmio()[0]
        domain = node.get("linux,pci-domain")
        msi_parent, _ = _msi_parent(fw, node)
        msi_map = node.get("msi-map")
        if msi_parent is None and msi_map is not None:
            msi_parent = fw.fwnode(fw.tree.resolve_phandle(msi_map.u32s()[1], msi_map))
        out.append(
            PciHostBridgeDesc(
                fw.fwnode(node),
                ecam.address,
                ecam.size,
                pci_bus_range(node),
                pci_ranges(node),
                domain.u32() if domain is not None else None,
                is_dma_coherent(node),
                node.has("iommu-map"),
                msi_parent,
            )
        )
    return tuple(out)


def pci_intx(fw: Firmware, bridge: FwNode, bdf: Bdf, pin: int) -> Resource | None:
    """The IRQ a function's INTx pin (1 = INTA .. 4 = INTD) raises, via ``interrupt-map``."""
    if not 1 <= pin <= 4:
        return None
    spec = map_interrupt(fw.node(bridge), pci_unit_address(bdf), (pin,))
    return irq_resource(spec) if spec is not None else None
