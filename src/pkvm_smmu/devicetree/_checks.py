"""Consistency checks run on every loaded tree, so a bad tree fails at load with its location,
not later as a puzzling machine.

Checked: phandle uniqueness; every phandle array of the common bindings resolves and has the
arity its targets' ``#xxx-cells`` demand; ID maps; ``reg`` shapes; required properties of the
nodes this model gives meaning to; and that no two memory or device ``reg`` ranges overlap.
"""

from __future__ import annotations

from pkvm_smmu.devicetree._bindings import iommu_map, msi_map
from pkvm_smmu.devicetree._errors import DeviceTreeError
from pkvm_smmu.devicetree._tree import DeviceTree, Node, RegEntry

# Phandle arrays of the common bindings and the cells property that sizes each specifier.
PHANDLE_ARRAYS: dict[str, str] = {
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
SINGLE_PHANDLES = ("interrupt-parent",)

SMMU_V3 = "arm,smmu-v3"
PCI_ECAM = "pci-host-ecam-generic"

# Subtrees whose reg are not claims on the physical address map (reserved-memory carves RAM).
_NOT_ADDRESS_MAP = ("/cpus", "/reserved-memory", "/__symbols__", "/__fixups__", "/__local_fixups__")


def check_tree(tree: DeviceTree) -> None:
    tree.by_phandle(0)  # builds the index, rejecting duplicate or reserved phandle values
    for node in tree.nodes():
        _check_phandles(node)
        iommu_map(node)
        msi_map(node)
        _check_required(node)
    check_reg_overlaps(tree)


def _check_phandles(node: Node) -> None:
    for name, prop in node.props.items():
        cells_name = PHANDLE_ARRAYS.get(name)
        if cells_name is None and name.endswith("-gpios"):
            cells_name = "#gpio-cells"
        if cells_name is not None:
            prop.phandle_args(cells_name)
        elif name in SINGLE_PHANDLES:
            prop.phandle()
        elif name == "msi-parent":
            _check_msi_parent(node)


def _check_msi_parent(node: Node) -> None:
    # A PCI host bridge names its MSI controller without the device-ID cell that platform
    # devices pass (#msi-cells counts it), so one bare phandle is accepted too, as Linux does.
    prop = node.prop("msi-parent")
    cells = prop.u32s()
    if len(cells) == 1:
        prop.phandle()
        return
    prop.phandle_args("#msi-cells", default_cells=0)


def _check_required(node: Node) -> None:
    if not node.available:
        return
    if node.device_type == "memory":
        node.prop("reg")
    if node.is_compatible(SMMU_V3):
        node.prop("reg")
        cells = node.prop("#iommu-cells").u32()
        if cells != 1:
            raise node.error(
                f"arm,smmu-v3 needs #iommu-cells = <1> (a StreamID), found <{cells}>", "#iommu-cells"
            )
    if node.is_compatible(PCI_ECAM):
        node.prop("reg")
        if node.address_cells != 3 or node.size_cells != 2:
            raise node.error("a PCI host bridge needs #address-cells = <3> and #size-cells = <2>")
    if node.has("iommus"):
        for entry in node.prop("iommus").phandle_args("#iommu-cells"):
            if not entry.target.available:
                continue  # Linux treats a disabled IOMMU as absent
            if entry.target.is_compatible(SMMU_V3) and len(entry.args) != 1:
                raise node.error(f"{entry.target.path} takes one StreamID cell", "iommus")


def _claims(tree: DeviceTree) -> list[tuple[RegEntry, Node]]:
    claims: list[tuple[RegEntry, Node]] = []
    for node in tree.nodes():
        if node.parent is None or not node.has("reg") or not node.available:
            continue
        if any(node.path == p or node.path.startswith(p + "/") for p in _NOT_ADDRESS_MAP):
            continue
        node.reg()  # shape errors surface even for nodes that are not memory mapped
        regions = node.translated_reg()
        if regions is None:
            continue
        claims += [(r, node) for r in regions if r.size > 0]
    return claims


def check_reg_overlaps(tree: DeviceTree) -> None:
    """No two ``reg`` ranges of different nodes overlap, unless one node contains the other (a
    parent's window may cover its children)."""
    claims = sorted(_claims(tree), key=lambda c: (c[0].address, c[0].size))
    active: list[tuple[RegEntry, Node]] = []
    for region, node in claims:
        active = [(r, n) for r, n in active if r.end > region.address]
        for other_region, other in active:
            if other is node or other.is_ancestor_of(node) or node.is_ancestor_of(other):
                continue
            raise DeviceTreeError(
                f"[{region.address:#x}, {region.end:#x}) overlaps {other.path} "
                f"[{other_region.address:#x}, {other_region.end:#x})",
                source=tree.source,
                path=node.path,
                prop="reg",
            )
        active.append((region, node))
