"""The device-tree side of of_dma_configure: ``iommus`` and ``iommu-map`` become fwspecs."""

from __future__ import annotations

from iommu_rig import build_rig

from pkvm_smmu.host.driver_core import PciDevice, PlatformDevice, pci_device_add, platform_device_register
from pkvm_smmu.host.firmware import Firmware
from pkvm_smmu.host.iommu import OfIommuFirmware
from pkvm_smmu.platforms import load_platform


def test_platform_iommus_and_pci_iommu_map_become_fwspecs() -> None:
    fw = Firmware(load_platform())
    smmu = fw.fwnode("/iommu@9050000")
    rig = build_rig()
    rig.core.firmware = OfIommuFirmware(fw)
    rig.iommu_node = smmu  # type: ignore[assignment]
    ops = rig.ops()
    assert rig.register_iommu(ops) == 0

    engine = PlatformDevice("endpoint", dev_name="a000000.dma", fwnode=fw.fwnode("/dma@a000000"))
    assert platform_device_register(rig.kernel, engine) == 0
    bridge = PlatformDevice("host-bridge", dev_name="3f000000.pcie", fwnode=fw.fwnode("/pcie@3f000000"))
    assert platform_device_register(rig.kernel, bridge) == 0
    fn = PciDevice(0x1AF4, 0x1000, bus_nr=1, devfn=0x10, parent=bridge)
    assert pci_device_add(rig.kernel, fn) == 0
    orphan = PciDevice(0x1AF4, 0x1000, devfn=0x18)  # no host bridge with a firmware node above it
    assert pci_device_add(rig.kernel, orphan) == 0

    assert engine.iommu_fwspec.iommu_fwnode == smmu and engine.iommu_fwspec.ids == [0x100]
    assert fn.iommu_fwspec.ids == [0x110]  # RID 01:02.0 through iommu-map <0x0 &smmu 0x0 0x10000>
    assert bridge.iommu_group is None and orphan.iommu_group is None
    assert ops.probed == ["a000000.dma", "0000:01:02.0"]
