"""The kernel's firmware layer: a device tree read the way Linux's OF code reads it.

Start from a loaded tree: ``fw = Firmware(load_devicetree(path))``. Then
``of_platform_populate(fw)`` describes the platform devices, ``smmu_descs(fw)`` and
``pci_host_bridge_descs(fw)`` what the SMMUv3 and PCIe host drivers read at probe,
``of_iommu_specs`` / ``of_pci_iommu_specs`` the IOMMU and IDs behind a device (the fwspec's
data), and ``of_fwnode_links`` what fw_devlink makes each node wait for. Devices are named by
``FwNode`` handles. Nothing here touches the hardware or decides anything.
"""

from pkvm_smmu.host.firmware.fw_devlink import FwnodeDependency, all_fwnode_links, of_fwnode_links
from pkvm_smmu.host.firmware.fwnode import FwNode
from pkvm_smmu.host.firmware.of import (
    IRQ_TYPE_EDGE_FALLING,
    IRQ_TYPE_EDGE_RISING,
    IRQ_TYPE_LEVEL_HIGH,
    IRQ_TYPE_LEVEL_LOW,
    Firmware,
    MemoryRegion,
    Resource,
    ResourceType,
)
from pkvm_smmu.host.firmware.of_iommu import OfIommuSpec, iommu_fwnodes, of_iommu_specs, of_pci_iommu_specs
from pkvm_smmu.host.firmware.of_platform import (
    PciHostBridgeDesc,
    PlatformDeviceDesc,
    SmmuDesc,
    device_name,
    is_dma_coherent,
    of_platform_populate,
    pci_host_bridge_descs,
    pci_intx,
    smmu_descs,
)

__all__ = [
    "IRQ_TYPE_EDGE_FALLING",
    "IRQ_TYPE_EDGE_RISING",
    "IRQ_TYPE_LEVEL_HIGH",
    "IRQ_TYPE_LEVEL_LOW",
    "Firmware",
    "FwNode",
    "FwnodeDependency",
    "MemoryRegion",
    "OfIommuSpec",
    "PciHostBridgeDesc",
    "PlatformDeviceDesc",
    "Resource",
    "ResourceType",
    "SmmuDesc",
    "all_fwnode_links",
    "device_name",
    "iommu_fwnodes",
    "is_dma_coherent",
    "of_fwnode_links",
    "of_iommu_specs",
    "of_pci_iommu_specs",
    "of_platform_populate",
    "pci_host_bridge_descs",
    "pci_intx",
    "smmu_descs",
]
