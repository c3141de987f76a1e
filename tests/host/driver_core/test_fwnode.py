"""fwnode lookups and the child-platform-device experiment from the v4 patch 15 thread: a device
sharing its parent's fwnode is invisible to fw_devlink and loses ``bus_find_device_by_fwnode()``."""

from __future__ import annotations

from driver_core_helpers import Node, RecordingDriver, booted_kernel

from pkvm_smmu.host.driver_core import (
    PlatformDevice,
    bus_find_device_by_fwnode,
    device_set_node,
    driver_find_device_by_fwnode,
    platform_device_register,
    platform_device_unregister,
    platform_driver_register,
)

SMMU = Node("/smmu@2b400000", ("arm,smmu-v3",))
NIC = Node("/ethernet@1c000000", ("vendor,nic",))


def test_bus_lookup_returns_the_first_registered_device_with_the_fwnode() -> None:
    b = booted_kernel()
    k = b.kernel
    first = PlatformDevice(dev_name="first")
    second = PlatformDevice(dev_name="second")
    device_set_node(first, SMMU)
    device_set_node(second, SMMU)
    platform_device_register(k, PlatformDevice(dev_name="unrelated", fwnode=NIC))
    platform_device_register(k, first)
    platform_device_register(k, second)
    assert bus_find_device_by_fwnode(k.platform_bus, SMMU) is first
    assert bus_find_device_by_fwnode(k.platform_bus, Node("/nowhere")) is None
    platform_device_unregister(k, first)
    assert bus_find_device_by_fwnode(k.platform_bus, SMMU) is second
    lookups = b.events("lookup")
    assert [(e.fields["found"], e.fields["candidates"]) for e in lookups] == [
        ("first", 2),
        (None, 0),
        ("second", 1),
    ]


def test_child_sharing_the_smmu_fwnode_reproduces_the_thread() -> None:
    """pKVM's driver binds the SMMU's platform device and spawns a child with the same fwnode for
    the SMMUv3 driver. Consumers are released when the *pKVM* driver binds, and the SMMUv3 driver's
    fwnode lookup by bus finds the pKVM device; a lookup by driver finds the right one."""
    b = booted_kernel()
    k = b.kernel
    k.fwnode_link_add(NIC, SMMU)
    nic_drv = RecordingDriver("nic", compatible="vendor,nic")
    smmu_drv = RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3")
    kvm_drv = RecordingDriver("kvm-arm-smmu-v3", compatible="arm,smmu-v3")
    children: list[PlatformDevice] = []

    def spawn_child(parent: PlatformDevice) -> None:
        child = PlatformDevice("arm-smmu-v3-kvm-child", 0, parent=parent)
        device_set_node(child, parent.fwnode)
        child.driver_override = "arm-smmu-v3"  # only the SMMUv3 driver may take the child
        children.append(child)

    kvm_drv.before_probe = spawn_child
    platform_driver_register(k, nic_drv)
    platform_driver_register(k, kvm_drv)  # pKVM's driver is registered; the SMMUv3 one is not yet

    smmu = PlatformDevice(dev_name="2b400000.iommu", fwnode=SMMU)
    platform_device_register(k, smmu)
    nic = PlatformDevice(dev_name="nic", fwnode=NIC)
    platform_device_register(k, nic)
    assert smmu.driver is kvm_drv
    # The consumer probed with no SMMUv3 driver anywhere: its supplier link points at the pKVM device.
    assert nic.driver is nic_drv
    assert [link.supplier.name for link in nic.links.suppliers] == ["2b400000.iommu"]

    (child,) = children
    platform_device_register(k, child)
    assert k.get_dev_from_fwnode(SMMU) is smmu  # the child never stands for the node
    platform_driver_register(k, smmu_drv)
    assert child.driver is smmu_drv and smmu.driver is kvm_drv

    # arm_smmu_get_by_fwnode() with bus_find_device_by_fwnode(): the wrong device.
    assert bus_find_device_by_fwnode(k.platform_bus, SMMU) is smmu
    # driver_find_device_by_fwnode(): only devices bound to the SMMUv3 driver, so the child.
    assert driver_find_device_by_fwnode(smmu_drv, SMMU) is child
    assert driver_find_device_by_fwnode(kvm_drv, SMMU) is smmu
    assert driver_find_device_by_fwnode(nic_drv, SMMU) is None


def test_fwnode_stands_for_the_next_device_only_after_a_remove_and_re_add() -> None:
    b = booted_kernel()
    k = b.kernel
    parent = PlatformDevice(dev_name="parent", fwnode=SMMU)
    platform_device_register(k, parent)
    child = PlatformDevice(dev_name="child", parent=parent, fwnode=SMMU)
    platform_device_register(k, child)
    platform_device_unregister(k, parent)
    assert k.get_dev_from_fwnode(SMMU) is None  # Linux clears fwnode->dev, and does not pick another
    assert bus_find_device_by_fwnode(k.platform_bus, SMMU) is child
