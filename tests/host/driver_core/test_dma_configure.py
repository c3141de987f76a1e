"""The ``bus->dma_configure`` step: it runs with ``dev.driver`` set, before the driver's probe, on
buses that have one; a failure means the probe never runs, and ``-EPROBE_DEFER`` defers."""

from __future__ import annotations

import errno

from driver_core_helpers import Node, RecordingDriver, booted_kernel, make_kernel

from pkvm_smmu.host.driver_core import (
    EPROBE_DEFER,
    AuxiliaryDevice,
    AuxiliaryDriver,
    Device,
    PciDevice,
    PciDeviceId,
    PciDriver,
    PlatformDevice,
    auxiliary_device_add,
    auxiliary_device_init,
    auxiliary_driver_register,
    pci_device_add,
    pci_register_driver,
    platform_device_register,
    platform_driver_register,
)

NIC = Node("/ethernet@1c000000", ("vendor,nic",))


class IommuGate:
    """Stands in for of_dma_configure(): defers until the IOMMU is "registered"."""

    def __init__(self, ret: int = -EPROBE_DEFER) -> None:
        self.ret = ret
        self.seen: list[tuple[str, str | None]] = []

    def __call__(self, dev: Device) -> int:
        self.seen.append((dev.name, dev.driver.name if dev.driver else None))
        return self.ret


def test_deferring_dma_configure_keeps_the_probe_from_running_and_defers() -> None:
    b = make_kernel()
    k = b.kernel
    gate = IommuGate()
    k.register_dma_configure(gate)
    nic_drv = RecordingDriver("nic", compatible="vendor,nic")
    k.module_init(lambda: platform_driver_register(k, nic_drv))
    nic = PlatformDevice(dev_name="nic", fwnode=NIC)
    platform_device_register(k, nic)

    k.run_initcalls(until="device_sync")
    assert gate.seen == [("nic", "nic")]  # the driver is already assigned when the hook runs
    assert nic_drv.probed == [] and nic.driver is None
    assert [dev.name for dev, _ in k.deferred_devices] == ["nic"]
    probe = b.probes("nic")[0]
    assert (probe["stage"], probe["result"], probe["reason"]) == (
        "dma_configure",
        "defer",
        "dma_configure: -EPROBE_DEFER",
    )

    gate.ret = 0  # the IOMMU driver registered
    k.run_initcalls()
    assert nic_drv.probed == ["nic"] and nic.driver is nic_drv


def test_other_dma_configure_errors_fail_the_bind_without_deferring_or_trying_other_drivers() -> None:
    b = booted_kernel()
    k = b.kernel
    k.register_dma_configure(IommuGate(-errno.ENODEV))
    first = RecordingDriver("first", compatible="vendor,nic")
    second = RecordingDriver("second", compatible="vendor,nic")
    platform_driver_register(k, first)
    platform_driver_register(k, second)
    nic = PlatformDevice(dev_name="nic", fwnode=NIC)
    platform_device_register(k, nic)
    assert first.probed == [] and second.probed == []
    assert nic.driver is None and k.deferred_devices == []
    assert [p["driver"] for p in b.probes("nic")] == ["first"]  # bus_for_each_drv() stopped


def test_pci_has_dma_configure_and_aux_does_not() -> None:
    b = booted_kernel()
    k = b.kernel
    gate = IommuGate(0)
    k.register_dma_configure(gate)
    ids: list[int] = []
    pci_register_driver(
        k, PciDriver("nvme", [PciDeviceId(0x144D)], lambda pdev, entry: ids.append(pdev.rid) or 0)
    )
    pdev = PciDevice(0x144D, 0xA808, bus_nr=1, devfn=0x08)
    pci_device_add(k, pdev)
    assert pdev.name == "0000:01:01.0" and ids == [0x108] and pdev.driver is not None

    parent = PlatformDevice("parent")
    platform_device_register(k, parent)
    auxiliary_driver_register(k, AuxiliaryDriver("d", lambda a, e: 0, ["m.x"]), "m")
    auxdev = AuxiliaryDevice("x", 0, parent)
    auxiliary_device_init(auxdev)
    auxiliary_device_add(k, auxdev, "m")
    assert auxdev.driver is not None
    assert [name for name, _ in gate.seen] == ["0000:01:01.0"]


def test_dma_cleanup_runs_on_unbind() -> None:
    b = booted_kernel()
    k = b.kernel
    cleaned: list[str] = []
    k.register_dma_cleanup(lambda dev: cleaned.append(dev.name))
    platform_driver_register(k, RecordingDriver("nic", compatible="vendor,nic"))
    nic = PlatformDevice(dev_name="nic", fwnode=NIC)
    platform_device_register(k, nic)
    k.device_release_driver(nic)
    assert cleaned == ["nic"]
