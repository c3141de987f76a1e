"""The faux bus (``drivers/base/faux.c``): devices with no hardware and no firmware node, bound the
moment they are created by the bus's single driver, which calls the creator's ``probe``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pkvm_smmu.host.driver_core.device import Bus, Device, DeviceDriver

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core._kernel import Kernel

FauxProbe = Callable[["FauxDevice"], int]
FauxRemove = Callable[["FauxDevice"], None]


class FauxDevice(Device):
    def __init__(
        self,
        name: str,
        parent: Device | None,
        probe: FauxProbe | None = None,
        remove: FauxRemove | None = None,
    ) -> None:
        super().__init__(name, parent=parent)
        self.faux_probe = probe
        self.faux_remove = remove


class FauxDriver(DeviceDriver):
    """The one driver on the faux bus; it matches every faux device."""


class FauxBus(Bus):
    name = "faux"
    driver_type = FauxDriver

    def match(self, dev: Device, drv: DeviceDriver) -> int:
        return 1

    def probe(self, dev: Device) -> int:
        if isinstance(dev, FauxDevice) and dev.faux_probe is not None:
            return dev.faux_probe(dev)
        return 0

    def remove(self, dev: Device) -> None:
        if isinstance(dev, FauxDevice) and dev.faux_remove is not None:
            dev.faux_remove(dev)


def faux_device_create(
    k: Kernel,
    name: str,
    parent: Device | None = None,
    probe: FauxProbe | None = None,
    remove: FauxRemove | None = None,
) -> FauxDevice | None:
    """Create, add and bind a faux device. ``probe`` runs before this returns; if it fails (even with
    ``-EPROBE_DEFER``) the device is torn down and None is returned."""
    fdev = FauxDevice(name, parent if parent is not None else k.faux_bus_root, probe, remove)
    fdev.bus = k.faux_bus
    if k.device_add(fdev):
        return None
    if fdev.driver is None:
        k._emit("faux.create_failed", device=name, reason=fdev.deferred_probe_reason)
        faux_device_destroy(k, fdev)
        return None
    return fdev


def faux_device_destroy(k: Kernel, fdev: FauxDevice) -> None:
    k.device_del(fdev)
