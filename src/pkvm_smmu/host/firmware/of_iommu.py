"""``of_iommu``: which IOMMU a device's DMA goes through, and with which IDs.

A platform device names its IOMMU(s) in ``iommus`` (phandle + ``#iommu-cells`` cells each); a PCI
function's requester ID goes through its host bridge's ``iommu-map`` after ``iommu-map-mask``
(Linux's ``of_map_id``). Either way the answer is a list of ``OfIommuSpec`` — the data the IOMMU
core turns into a fwspec. An empty list means the device has no IOMMU (no ``iommus``; no
``iommu-map``; or a RID no map entry covers). A disabled IOMMU node is reported with
``available=False``: Linux's ``of_iommu_xlate`` refuses it with -ENODEV.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkvm_smmu.devicetree import Bdf, iommu_map
from pkvm_smmu.host.firmware.fwnode import FwNode
from pkvm_smmu.host.firmware.of import Firmware


@dataclass(frozen=True)
class OfIommuSpec:
    """``struct of_phandle_args`` for an IOMMU: the IOMMU's fwnode and the cells after the phandle
    (for arm-smmu-v3, one StreamID)."""

    fwnode: FwNode
    args: tuple[int, ...]
    available: bool = True


def of_iommu_specs(fw: Firmware, fwnode: FwNode) -> list[OfIommuSpec]:
    """A platform node's ``iommus``, one spec per entry, in order."""
    prop = fw.node(fwnode).get("iommus")
    if prop is None:
        return []
    return [
        OfIommuSpec(fw.fwnode(entry.target), entry.args, entry.target.available)
        for entry in prop.phandle_args("#iommu-cells")
    ]


def of_pci_iommu_specs(fw: Firmware, bridge: FwNode, rid: int | Bdf) -> list[OfIommuSpec]:
    """A PCI requester ID under host bridge ``bridge`` through its ``iommu-map``."""
    requester = rid.rid if isinstance(rid, Bdf) else rid
    mapping = iommu_map(fw.node(bridge))
    found = mapping.lookup(requester) if mapping is not None else None
    if found is None:
        return []
    target, stream_id = found
    return [OfIommuSpec(fw.fwnode(target), (stream_id,), target.available)]


def iommu_fwnodes(fw: Firmware) -> tuple[FwNode, ...]:
    """Every node some ``iommus`` or ``iommu-map`` names: the IOMMUs devices will wait for."""
    seen: dict[str, FwNode] = {}
    for node in fw.tree.nodes():
        handle = fw.fwnode(node)
        specs = of_iommu_specs(fw, handle)
        mapping = iommu_map(node)
        targets = [s.fwnode for s in specs]
        targets += [fw.fwnode(entry.target) for entry in (mapping.entries if mapping else ())]
        for target in targets:
            seen.setdefault(target.path, target)
    return tuple(seen.values())
