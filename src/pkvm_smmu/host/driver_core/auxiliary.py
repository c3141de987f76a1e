"""The auxiliary bus (``drivers/base/auxiliary.c``): a driver splits off parts of its device as
``<modname>.<devname>.<id>`` devices that other drivers bind by ``<modname>.<devname>``."""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pkvm_smmu.host.driver_core._initcall import InitcallLevel
from pkvm_smmu.host.driver_core.device import Bus, Device, DeviceDriver

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core._kernel import Kernel


@dataclass(frozen=True)
class AuxiliaryDeviceId:
    """``struct auxiliary_device_id``: ``name`` is ``"<modname>.<devname>"``."""

    name: str
    driver_data: object = None


class AuxiliaryDevice(Device):
    """``struct auxiliary_device``. ``aux_name`` is ``auxdev->name`` (the ``<devname>`` part);
    ``name`` becomes ``<modname>.<devname>.<id>`` when it is added."""

    def __init__(self, name: str, id: int, parent: Device | None) -> None:
        super().__init__("", parent=parent)
        self.aux_name = name
        self.id = id
        self.initialized = False


class AuxiliaryDriver(DeviceDriver):
    def __init__(
        self,
        name: str,
        probe: Callable[[AuxiliaryDevice, AuxiliaryDeviceId], int] | None,
        id_table: Sequence[AuxiliaryDeviceId | str],
        remove: Callable[[AuxiliaryDevice], None] | None = None,
        *,
        suppress_bind_attrs: bool = False,
    ) -> None:
        super().__init__(name, suppress_bind_attrs=suppress_bind_attrs)
        self.probe = probe
        self.remove = remove
        self.id_table = tuple(AuxiliaryDeviceId(item) if isinstance(item, str) else item for item in id_table)


def auxiliary_match_id(
    table: Sequence[AuxiliaryDeviceId], auxdev: AuxiliaryDevice
) -> AuxiliaryDeviceId | None:
    """Match on the device name up to its last ``.``: ``mod.dev.3`` matches ``mod.dev``."""
    prefix, dot, _ = auxdev.name.rpartition(".")
    if not dot:
        return None
    return next((entry for entry in table if entry.name == prefix), None)


class AuxiliaryBus(Bus):
    name = "auxiliary"
    driver_type = AuxiliaryDriver

    def match(self, dev: Device, drv: DeviceDriver) -> int:
        if not isinstance(dev, AuxiliaryDevice) or not isinstance(drv, AuxiliaryDriver):
            return 0
        return int(auxiliary_match_id(drv.id_table, dev) is not None)

    def probe(self, dev: Device) -> int:
        drv = dev.driver
        if not isinstance(dev, AuxiliaryDevice) or not isinstance(drv, AuxiliaryDriver) or drv.probe is None:
            return -errno.ENODEV
        entry = auxiliary_match_id(drv.id_table, dev)
        if entry is None:
            return -errno.ENODEV
        return drv.probe(dev, entry)

    def remove(self, dev: Device) -> None:
        drv = dev.driver
        if isinstance(dev, AuxiliaryDevice) and isinstance(drv, AuxiliaryDriver) and drv.remove is not None:
            drv.remove(dev)


def auxiliary_device_init(auxdev: AuxiliaryDevice) -> int:
    """Check what ``auxiliary_device_add()`` needs: a parent and a name."""
    if auxdev.parent is None:
        return -errno.EINVAL  # "auxiliary_device has a NULL dev->parent"
    if not auxdev.aux_name:
        return -errno.EINVAL  # "auxiliary_device has a NULL name"
    auxdev.initialized = True
    return 0


def auxiliary_device_add(k: Kernel, auxdev: AuxiliaryDevice, modname: str) -> int:
    """``__auxiliary_device_add(auxdev, KBUILD_MODNAME)``: name it and add it (binding at once if a
    driver matches)."""
    if not auxdev.initialized:
        return -errno.EINVAL
    if not modname:
        return -errno.EINVAL
    auxdev.name = f"{modname}.{auxdev.aux_name}.{auxdev.id}"
    auxdev.bus = k.auxiliary_bus
    ret = k.device_add(auxdev)
    if ret:
        auxdev.name = ""
    return ret


def auxiliary_device_delete(k: Kernel, auxdev: AuxiliaryDevice) -> None:
    k.device_del(auxdev)


def auxiliary_driver_register(k: Kernel, auxdrv: AuxiliaryDriver, modname: str) -> int:
    """The driver is called ``<modname>.<name>`` (or ``<modname>`` when it has no name)."""
    if auxdrv.probe is None or not auxdrv.id_table:
        return -errno.EINVAL
    auxdrv.name = f"{modname}.{auxdrv.name}" if auxdrv.name else modname
    return k.driver_register(auxdrv, k.auxiliary_bus)


def auxiliary_driver_unregister(k: Kernel, auxdrv: AuxiliaryDriver) -> None:
    k.driver_unregister(auxdrv)


def module_auxiliary_driver(k: Kernel, auxdrv: AuxiliaryDriver, modname: str) -> None:
    k.register_initcall(
        InitcallLevel.DEVICE, lambda: auxiliary_driver_register(k, auxdrv, modname), f"{modname}_init"
    )
