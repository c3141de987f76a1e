"""fw_devlink's reading of the tree: which node depends on which (drivers/of/property.c).

For each consumer node, every property of the supplier bindings names supplier nodes. A supplier
is the nearest ancestor-or-self with ``compatible`` (``of_get_compat_node``: the node a device
will stand for). Links to the consumer itself or to one of its ancestors are dropped: a child is
never probed before its parent anyway, and such a link would be a cycle.

``populated`` says whether ``of_platform_populate`` makes a device for the supplier; one that
never gets a device (an interrupt controller brought up early) must not hold the consumer back,
which is the driver core's call to make.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkvm_smmu.devicetree import Node, id_map, interrupt_parent
from pkvm_smmu.host.firmware.fwnode import FwNode
from pkvm_smmu.host.firmware.of import Firmware
from pkvm_smmu.host.firmware.of_platform import DEFAULT_BUS_MATCHES

# Phandle-array supplier bindings (a subset of Linux's of_supplier_bindings) -> their cells name.
SUPPLIER_ARRAYS = {
    "iommus": "#iommu-cells",
    "clocks": "#clock-cells",
    "resets": "#reset-cells",
    "power-domains": "#power-domain-cells",
    "phys": "#phy-cells",
    "dmas": "#dma-cells",
    "mboxes": "#mbox-cells",
    "interrupts-extended": "#interrupt-cells",
    "gpios": "#gpio-cells",
}


@dataclass(frozen=True)
class FwnodeDependency:
    """``consumer`` depends on ``supplier`` because of ``property``."""

    consumer: FwNode
    supplier: FwNode
    property: str
    populated: bool  # the supplier gets a platform device


def _compat_node(node: Node) -> Node | None:
    current: Node | None = node
    while current is not None and current.parent is not None:
        if current.has("compatible"):
            return current
        current = current.parent
    return None


def _targets(node: Node) -> list[tuple[str, Node]]:
    found: list[tuple[str, Node]] = []
    for name, prop in node.props.items():
        cells = SUPPLIER_ARRAYS.get(name) or ("#gpio-cells" if name.endswith("-gpios") else None)
        if cells is not None:
            found += [(name, entry.target) for entry in prop.phandle_args(cells)]
        elif name == "msi-parent":
            first = prop.u32s()[0]
            found.append((name, node.tree.resolve_phandle(first, prop)))
    for name, mask in (("iommu-map", "iommu-map-mask"), ("msi-map", "msi-map-mask")):
        mapping = id_map(node, name, mask)
        found += [(name, entry.target) for entry in (mapping.entries if mapping else ())]
    if node.has("interrupts") and not node.has("interrupts-extended"):
        parent = interrupt_parent(node)
        if parent is not None:
            found.append(("interrupts", parent))
    return found


def of_fwnode_links(fw: Firmware, fwnode: FwNode) -> tuple[FwnodeDependency, ...]:
    """The suppliers of one node, once each, in property order."""
    node = fw.node(fwnode)
    out: dict[str, FwnodeDependency] = {}
    for prop, target in _targets(node):
        supplier = _compat_node(target)
        if supplier is None or supplier is node or supplier.is_ancestor_of(node):
            continue
        if supplier.path not in out:
            is_irqchip = supplier.has("interrupt-controller")
            populated = supplier.available and not is_irqchip and _on_populated_bus(supplier)
            out[supplier.path] = FwnodeDependency(fwnode, fw.fwnode(supplier), prop, populated)
    return tuple(out.values())


def _on_populated_bus(node: Node) -> bool:
    parent = node.parent
    while parent is not None and parent.parent is not None:
        if not parent.is_compatible(*DEFAULT_BUS_MATCHES):
            return False
        parent = parent.parent
    return True


def all_fwnode_links(fw: Firmware) -> tuple[FwnodeDependency, ...]:
    """Every dependency in the tree, consumers in tree order."""
    out: list[FwnodeDependency] = []
    for node in fw.tree.nodes():
        out += of_fwnode_links(fw, fw.fwnode(node))
    return tuple(out)
