"""The platform bus (``drivers/base/platform.c``): devices firmware describes, with MMIO and IRQ
resources, matched to drivers by OF compatible, id table or name."""

from __future__ import annotations

import errno
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pkvm_smmu.host.driver_core._errno import EPROBE_DEFER
from pkvm_smmu.host.driver_core._initcall import InitcallLevel
from pkvm_smmu.host.driver_core.device import Bus, Device, DeviceDriver, OfMatchTable, of_match_device

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core._kernel import Kernel

PLATFORM_DEVID_NONE = -1
PLATFORM_DEVID_AUTO = -2

IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_IRQ = 0x00000400
IORESOURCE_TYPE_BITS = 0x00001F00


@dataclass(frozen=True)
class Resource:
    """``struct resource``: ``end`` is inclusive, as in Linux."""

    start: int
    end: int
    flags: int
    name: str | None = None

    @property
    def size(self) -> int:
        return self.end - self.start + 1


def resource_size(res: Resource) -> int:
    return res.size


def resource_type(res: Resource) -> int:
    return res.flags & IORESOURCE_TYPE_BITS


def DEFINE_RES_MEM(start: int, size: int, name: str | None = None) -> Resource:
    return Resource(start, start + size - 1, IORESOURCE_MEM, name)


def DEFINE_RES_IRQ(irq: int, name: str | None = None) -> Resource:
    return Resource(irq, irq, IORESOURCE_IRQ, name)


class PlatformDevice(Device):
    """``struct platform_device``. ``platform_name`` is ``pdev->name`` (used for name and id-table
    matching); devices made from a device tree have an empty one and a ``dev_name`` from the node."""

    def __init__(
        self,
        name: str = "",
        id: int = PLATFORM_DEVID_NONE,
        *,
        dev_name: str | None = None,
        parent: Device | None = None,
        fwnode: Hashable | None = None,
        resources: Sequence[Resource] = (),
    ) -> None:
        super().__init__(dev_name or "", parent=parent, fwnode=fwnode)
        self.platform_name = name
        self.id = id
        self.id_auto = False
        self.resources: tuple[Resource, ...] = tuple(resources)

    @property
    def num_resources(self) -> int:
        return len(self.resources)


@dataclass(frozen=True)
class PlatformDeviceId:
    name: str
    driver_data: object = None


class PlatformDriver(DeviceDriver):
    def __init__(
        self,
        name: str,
        probe: Callable[[PlatformDevice], int] | None = None,
        remove: Callable[[PlatformDevice], None] | None = None,
        *,
        of_match_table: OfMatchTable = (),
        id_table: Sequence[PlatformDeviceId] = (),
        suppress_bind_attrs: bool = False,
        driver_managed_dma: bool = False,
        prevent_deferred_probe: bool = False,
    ) -> None:
        super().__init__(name, of_match_table=of_match_table, suppress_bind_attrs=suppress_bind_attrs)
        self.probe = probe
        self.remove = remove
        self.id_table = tuple(id_table)
        # VFIO-style drivers manage DMA themselves; the IOMMU core reads this in its hook.
        self.driver_managed_dma = driver_managed_dma
        self.prevent_deferred_probe = prevent_deferred_probe


def platform_match_id(table: Sequence[PlatformDeviceId], pdev: PlatformDevice) -> PlatformDeviceId | None:
    return next((entry for entry in table if entry.name == pdev.platform_name), None)


class PlatformBus(Bus):
    name = "platform"
    driver_type = PlatformDriver
    has_dma_configure = True

    def match(self, dev: Device, drv: DeviceDriver) -> int:
        if not isinstance(dev, PlatformDevice) or not isinstance(drv, PlatformDriver):
            return 0
        if dev.driver_override is not None:  # only the named driver may bind
            return int(dev.driver_override == drv.name)
        if of_match_device(drv.of_match_table, dev) is not None:
            return 1
        if drv.id_table:
            return int(platform_match_id(drv.id_table, dev) is not None)
        return int(bool(dev.platform_name) and dev.platform_name == drv.name)

    def probe(self, dev: Device) -> int:
        drv = dev.driver
        if not isinstance(dev, PlatformDevice) or not isinstance(drv, PlatformDriver):
            return -errno.ENODEV
        ret = drv.probe(dev) if drv.probe is not None else 0
        if drv.prevent_deferred_probe and ret == -EPROBE_DEFER:
            return -errno.ENXIO  # "probe deferral not supported"
        return ret

    def remove(self, dev: Device) -> None:
        drv = dev.driver
        if isinstance(dev, PlatformDevice) and isinstance(drv, PlatformDriver) and drv.remove is not None:
            drv.remove(dev)


def to_platform_device(dev: Device) -> PlatformDevice:
    if not isinstance(dev, PlatformDevice):
        raise TypeError(f"{dev!r} is not a platform device")
    return dev


def platform_device_register(k: Kernel, pdev: PlatformDevice) -> int:
    """Name it (``name``, ``name.id`` or ``name.N.auto``) unless firmware gave it a name, and add it."""
    if not pdev.name:
        if pdev.id == PLATFORM_DEVID_AUTO:
            pdev.id = k.platform_devid_ida
            k.platform_devid_ida += 1
            pdev.id_auto = True
            pdev.name = f"{pdev.platform_name}.{pdev.id}.auto"
        elif pdev.id == PLATFORM_DEVID_NONE:
            pdev.name = pdev.platform_name
        else:
            pdev.name = f"{pdev.platform_name}.{pdev.id}"
    pdev.bus = k.platform_bus
    return k.device_add(pdev)


def platform_device_unregister(k: Kernel, pdev: PlatformDevice) -> None:
    k.device_del(pdev)


def platform_driver_register(k: Kernel, drv: PlatformDriver) -> int:
    return k.driver_register(drv, k.platform_bus)


def platform_driver_unregister(k: Kernel, drv: PlatformDriver) -> None:
    k.driver_unregister(drv)


def module_platform_driver(k: Kernel, drv: PlatformDriver) -> None:
    """Built in, ``module_platform_driver()`` registers the driver from a ``device_initcall``."""
    k.register_initcall(InitcallLevel.DEVICE, lambda: platform_driver_register(k, drv), f"{drv.name}_init")


builtin_platform_driver = module_platform_driver


def platform_get_resource(pdev: PlatformDevice, type: int, num: int) -> Resource | None:
    """The ``num``-th resource of ``type`` (``IORESOURCE_MEM``, ``IORESOURCE_IRQ``...)."""
    matching = [res for res in pdev.resources if resource_type(res) == type]
    return matching[num] if 0 <= num < len(matching) else None


def platform_get_resource_byname(pdev: PlatformDevice, type: int, name: str) -> Resource | None:
    return next((res for res in pdev.resources if resource_type(res) == type and res.name == name), None)


def platform_get_irq(pdev: PlatformDevice, num: int) -> int:
    res = platform_get_resource(pdev, IORESOURCE_IRQ, num)
    return res.start if res is not None else -errno.ENXIO


def platform_get_irq_byname(pdev: PlatformDevice, name: str) -> int:
    res = platform_get_resource_byname(pdev, IORESOURCE_IRQ, name)
    return res.start if res is not None else -errno.ENXIO
