"""``struct device``, ``struct device_driver`` and ``struct bus_type``, plus OF (device-tree) matching.

These are mostly data; what happens to them lives in the kernel's driver core (``Kernel``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pkvm_smmu.host.driver_core._devlink import DevLinksInfo

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core._kernel import Kernel

DmaConfigure = Callable[["Device"], int]
DmaCleanup = Callable[["Device"], None]
BusNotifier = Callable[[str, "Device"], None]


class Device:
    """A device. ``name`` is ``dev_name(dev)``; ``fwnode`` is an opaque, hashable firmware handle.

    The ``iommu*`` and ``dma_ops`` slots belong to the IOMMU core, which fills them; the driver core
    only clears what Linux clears on unbind.
    """

    def __init__(
        self,
        name: str = "",
        *,
        bus: Bus | None = None,
        parent: Device | None = None,
        fwnode: Hashable | None = None,
    ) -> None:
        self.name = name
        self.bus = bus
        self.parent = parent
        self.fwnode = fwnode
        self.driver: DeviceDriver | None = None
        self.driver_data: Any = None
        self.driver_override: str | None = None
        # For the IOMMU core.
        self.iommu_fwspec: Any = None
        self.iommu_group: Any = None
        self.iommu: Any = None
        self.dma_ops: Any = None
        # Driver-core state.
        self.kernel: Kernel | None = None
        self.children: list[Device] = []
        self.links = DevLinksInfo()
        self.can_match = False  # a driver matched at some point, so deferring is worth it
        self.registered = False  # device_is_registered()
        self.dead = False  # device_del() has started
        self.bound = False  # device_is_bound(): probe succeeded and driver_bound() ran
        self.deferred_probe_reason: str | None = None

    @property
    def of_node(self) -> Hashable | None:
        return self.fwnode

    def __repr__(self) -> str:
        bus = self.bus.name if self.bus else "-"
        drv = self.driver.name if self.driver else None
        return f"<{type(self).__name__} {self.name!r} bus={bus} driver={drv!r}>"


def dev_fwnode(dev: Device) -> Hashable | None:
    return dev.fwnode


def dev_get_drvdata(dev: Device) -> Any:
    return dev.driver_data


def dev_set_drvdata(dev: Device, data: Any) -> None:
    dev.driver_data = data


def fwnode_name(fwnode: Hashable | None) -> str | None:
    """How traces name a firmware node: its ``full_name`` if it has one, else ``str()``."""
    if fwnode is None:
        return None
    full_name = getattr(fwnode, "full_name", None)
    return full_name if isinstance(full_name, str) else str(fwnode)


@dataclass(frozen=True)
class OfDeviceId:
    """``struct of_device_id``: a compatible string and the driver's data for it."""

    compatible: str
    data: Any = None


OfMatchTable = Sequence["str | OfDeviceId"]


def fwnode_compatible(fwnode: Hashable | None) -> tuple[str, ...]:
    """The node's ``compatible`` strings, most specific first (empty if it has none)."""
    compatible = getattr(fwnode, "compatible", None)
    if compatible is None:
        return ()
    if isinstance(compatible, str):
        return (compatible,)
    return tuple(str(item) for item in compatible)


def of_match_device(table: OfMatchTable, dev: Device) -> OfDeviceId | None:
    """The best entry of ``table`` for ``dev``: the one matching the device's earliest compatible
    string (``of_match_node`` scoring, reduced to compatible strings)."""
    entries = [OfDeviceId(item) if isinstance(item, str) else item for item in table]
    for compatible in fwnode_compatible(dev.fwnode):
        for entry in entries:
            if entry.compatible == compatible:
                return entry
    return None


def of_device_get_match_data(dev: Device) -> Any:
    drv = dev.driver
    if drv is None:
        return None
    entry = of_match_device(drv.of_match_table, dev)
    return entry.data if entry else None


class DeviceDriver:
    """``struct device_driver``. Bus-specific drivers subclass it and add their ``probe``/``remove``."""

    def __init__(
        self,
        name: str,
        *,
        of_match_table: OfMatchTable = (),
        suppress_bind_attrs: bool = False,
    ) -> None:
        self.name = name
        self.bus: Bus | None = None
        self.of_match_table: OfMatchTable = tuple(of_match_table)
        # Linux hides the sysfs bind/unbind files; here Kernel.unbind_store() refuses.
        self.suppress_bind_attrs = suppress_bind_attrs
        self.devices: list[Device] = []  # bound devices, in bind order (klist_devices)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} bus={self.bus.name if self.bus else '-'}>"


class Bus:
    """``struct bus_type``. One instance per bus per kernel.

    ``dma_configure_hooks`` is the ``bus->dma_configure`` step of ``really_probe()``: the IOMMU core
    registers its ``of_dma_configure`` equivalent there. A hook returning non-zero stops the probe
    before the driver's ``probe`` runs (``-EPROBE_DEFER`` puts the device on the deferred list).
    """

    name: ClassVar[str] = "bus"
    driver_type: ClassVar[type[DeviceDriver]] = DeviceDriver
    has_dma_configure: ClassVar[bool] = False

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.devices: list[Device] = []  # registration order (klist_devices)
        self.drivers: list[DeviceDriver] = []  # registration order (klist_drivers)
        self.drivers_autoprobe = True
        self.dma_configure_hooks: list[DmaConfigure] = []
        self.dma_cleanup_hooks: list[DmaCleanup] = []
        self.notifiers: list[BusNotifier] = []  # called as notifier(event, dev): BUS_NOTIFY_* events

    def match(self, dev: Device, drv: DeviceDriver) -> int:
        """>0 match, 0 no match, <0 error (``-EPROBE_DEFER``: cannot tell yet)."""
        return 0

    def probe(self, dev: Device) -> int:
        """Call the bound driver's probe for ``dev`` (``dev.driver`` is set)."""
        return 0

    def remove(self, dev: Device) -> None:
        """Call the bound driver's remove for ``dev``."""

    def dma_configure(self, dev: Device) -> int:
        for hook in self.dma_configure_hooks:
            ret = hook(dev)
            if ret:
                return ret
        return 0

    def dma_cleanup(self, dev: Device) -> None:
        for hook in self.dma_cleanup_hooks:
            hook(dev)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
