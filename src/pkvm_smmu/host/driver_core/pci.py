"""The PCI bus, reduced to what binding needs: ids, id-table matching, ``dma_configure``."""

from __future__ import annotations

import errno
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pkvm_smmu.host.driver_core._initcall import InitcallLevel
from pkvm_smmu.host.driver_core.device import Bus, Device, DeviceDriver

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core._kernel import Kernel

PCI_ANY_ID = 0xFFFF_FFFF


class PciDevice(Device):
    """``struct pci_dev``; named ``DDDD:BB:SS.F``. ``rid`` is the requester ID firmware maps to a
    StreamID (``iommu-map``)."""

    def __init__(
        self,
        vendor: int,
        device: int,
        *,
        bus_nr: int = 0,
        devfn: int = 0,
        domain: int = 0,
        class_code: int = 0,
        subsystem_vendor: int = 0,
        subsystem_device: int = 0,
        parent: Device | None = None,
        fwnode: Hashable | None = None,
    ) -> None:
        name = f"{domain:04x}:{bus_nr:02x}:{devfn >> 3:02x}.{devfn & 7}"
        super().__init__(name, parent=parent, fwnode=fwnode)
        self.vendor = vendor
        self.device = device
        self.bus_nr = bus_nr
        self.devfn = devfn
        self.domain = domain
        self.class_code = class_code
        self.subsystem_vendor = subsystem_vendor
        self.subsystem_device = subsystem_device

    @property
    def rid(self) -> int:
        return (self.bus_nr << 8) | self.devfn


@dataclass(frozen=True)
class PciDeviceId:
    vendor: int = PCI_ANY_ID
    device: int = PCI_ANY_ID
    subvendor: int = PCI_ANY_ID
    subdevice: int = PCI_ANY_ID
    class_code: int = 0
    class_mask: int = 0
    driver_data: object = None


def pci_match_one_device(entry: PciDeviceId, pdev: PciDevice) -> bool:
    return (
        entry.vendor in (PCI_ANY_ID, pdev.vendor)
        and entry.device in (PCI_ANY_ID, pdev.device)
        and entry.subvendor in (PCI_ANY_ID, pdev.subsystem_vendor)
        and entry.subdevice in (PCI_ANY_ID, pdev.subsystem_device)
        and not (entry.class_code ^ pdev.class_code) & entry.class_mask
    )


def pci_match_id(table: Sequence[PciDeviceId], pdev: PciDevice) -> PciDeviceId | None:
    return next((entry for entry in table if pci_match_one_device(entry, pdev)), None)


class PciDriver(DeviceDriver):
    def __init__(
        self,
        name: str,
        id_table: Sequence[PciDeviceId],
        probe: Callable[[PciDevice, PciDeviceId], int] | None = None,
        remove: Callable[[PciDevice], None] | None = None,
        *,
        driver_managed_dma: bool = False,
    ) -> None:
        super().__init__(name)
        self.id_table = tuple(id_table)
        self.probe = probe
        self.remove = remove
        self.driver_managed_dma = driver_managed_dma


class PciBus(Bus):
    name = "pci"
    driver_type = PciDriver
    has_dma_configure = True

    def match(self, dev: Device, drv: DeviceDriver) -> int:
        if not isinstance(dev, PciDevice) or not isinstance(drv, PciDriver):
            return 0
        if dev.driver_override is not None:
            return int(dev.driver_override == drv.name)
        return int(pci_match_id(drv.id_table, dev) is not None)

    def probe(self, dev: Device) -> int:
        drv = dev.driver
        if not isinstance(dev, PciDevice) or not isinstance(drv, PciDriver):
            return -errno.ENODEV
        entry = pci_match_id(drv.id_table, dev)
        if entry is None:
            return -errno.ENODEV
        return drv.probe(dev, entry) if drv.probe is not None else 0

    def remove(self, dev: Device) -> None:
        drv = dev.driver
        if isinstance(dev, PciDevice) and isinstance(drv, PciDriver) and drv.remove is not None:
            drv.remove(dev)


def pci_device_add(k: Kernel, pdev: PciDevice) -> int:
    """Enumeration found ``pdev``: add it and let a driver bind (``pci_bus_add_device()``)."""
    pdev.bus = k.pci_bus
    return k.device_add(pdev)


def pci_stop_and_remove_bus_device(k: Kernel, pdev: PciDevice) -> None:
    k.device_del(pdev)


def pci_register_driver(k: Kernel, drv: PciDriver) -> int:
    return k.driver_register(drv, k.pci_bus)


def pci_unregister_driver(k: Kernel, drv: PciDriver) -> None:
    k.driver_unregister(drv)


def module_pci_driver(k: Kernel, drv: PciDriver) -> None:
    k.register_initcall(InitcallLevel.DEVICE, lambda: pci_register_driver(k, drv), f"{drv.name}_init")
