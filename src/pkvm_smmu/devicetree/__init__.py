"""A neutral device-tree loader shared by the hardware (``machine``) and the kernel (``host``).

``load_devicetree(path)`` reads a DTS (through dtlib, ``/include/`` relative to the file) or a DTB
(through fdt) into one typed tree; ``load_devicetree_string(text, name)`` does the same for text.
Every problem is a ``DeviceTreeError`` naming the file, the node path and the property. The
binding decoders (ID maps, PCI, interrupts) describe what both sides read; this package imports
nothing else of ``pkvm_smmu``.
"""

from pkvm_smmu.devicetree._bindings import (
    Bdf,
    IdMap,
    IdMapEntry,
    InterruptSpec,
    PciRange,
    PciSpace,
    id_map,
    interrupt_parent,
    interrupts,
    iommu_map,
    is_gic,
    map_interrupt,
    msi_map,
    pci_bus_range,
    pci_ranges,
    pci_unit_address,
)
from pkvm_smmu.devicetree._checks import PCI_ECAM, SMMU_V3, check_tree
from pkvm_smmu.devicetree._errors import DeviceTreeError
from pkvm_smmu.devicetree._load import (
    load_devicetree,
    load_devicetree_blob,
    load_devicetree_string,
    to_dtb,
)
from pkvm_smmu.devicetree._tree import DeviceTree, Node, PhandleArgs, Property, RangeEntry, RegEntry

__all__ = [
    "PCI_ECAM",
    "SMMU_V3",
    "Bdf",
    "DeviceTree",
    "DeviceTreeError",
    "IdMap",
    "IdMapEntry",
    "InterruptSpec",
    "Node",
    "PciRange",
    "PciSpace",
    "PhandleArgs",
    "Property",
    "RangeEntry",
    "RegEntry",
    "check_tree",
    "id_map",
    "interrupt_parent",
    "interrupts",
    "iommu_map",
    "is_gic",
    "load_devicetree",
    "load_devicetree_blob",
    "load_devicetree_string",
    "map_interrupt",
    "msi_map",
    "pci_bus_range",
    "pci_ranges",
    "pci_unit_address",
    "to_dtb",
]
