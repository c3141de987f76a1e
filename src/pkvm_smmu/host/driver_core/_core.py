"""Adding and removing devices and drivers (``drivers/base/core.c``, ``bus.c``, ``driver.c``) and
the lookups drivers use to find each other's devices."""

from __future__ import annotations

import errno
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from pkvm_smmu.host.driver_core import _dd, _deferred, _fwdevlink, _links
from pkvm_smmu.host.driver_core.device import Bus, Device, DeviceDriver, fwnode_name

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core._kernel import Kernel


def device_add(k: Kernel, dev: Device) -> int:
    if dev.registered:
        return -errno.EINVAL
    if not dev.name:
        return -errno.EINVAL
    if dev.parent is not None and dev.parent.dead:
        return -errno.ENODEV
    bus = dev.bus
    if bus is not None and any(other.name == dev.name for other in bus.devices):
        return -errno.EEXIST  # sysfs: /sys/bus/<bus>/devices/<name> already exists
    dev.kernel = k
    dev.registered = True
    dev.dead = False
    k.devices.append(dev)
    if dev.parent is not None:
        dev.parent.children.append(dev)
    if bus is not None:
        bus.devices.append(dev)
    k._emit(
        "device_add",
        device=dev.name,
        bus=bus.name if bus else None,
        parent=dev.parent.name if dev.parent else None,
        fwnode=fwnode_name(dev.fwnode),
    )
    k.bus_notify(dev, _dd.BUS_NOTIFY_ADD_DEVICE)
    # Only the first device registered with a fwnode stands for it (fwnode->dev).
    if dev.fwnode is not None and dev.fwnode not in k.fwnode_dev:
        k.fwnode_dev[dev.fwnode] = dev
        _fwdevlink.fw_devlink_link_device(k, dev)
    _dd.bus_probe_device(k, dev)
    return 0


def device_del(k: Kernel, dev: Device) -> None:
    if not dev.registered:
        return
    dev.dead = True
    k._emit("device_del", device=dev.name)
    k.bus_notify(dev, _dd.BUS_NOTIFY_DEL_DEVICE)
    if dev.fwnode is not None and k.fwnode_dev.get(dev.fwnode) is dev:
        del k.fwnode_dev[dev.fwnode]
    bus = dev.bus
    if bus is not None:
        _dd.device_release_driver_internal(k, dev)
        if dev in bus.devices:
            bus.devices.remove(dev)
    _deferred.driver_deferred_probe_del(k, dev)
    _links.device_links_purge(k, dev)
    if dev in k.devices:
        k.devices.remove(dev)
    if dev.parent is not None and dev in dev.parent.children:
        dev.parent.children.remove(dev)
    dev.registered = False
    k.bus_notify(dev, _dd.BUS_NOTIFY_REMOVED_DEVICE)


def driver_register(k: Kernel, drv: DeviceDriver, bus: Bus) -> int:
    if not isinstance(drv, bus.driver_type):
        k._emit(
            "driver_register",
            driver=drv.name,
            bus=bus.name,
            ret=-errno.EINVAL,
            why=f"not a {bus.driver_type.__name__}",
        )
        return -errno.EINVAL
    if drv in bus.drivers or driver_find(drv.name, bus) is not None:
        k._emit("driver_register", driver=drv.name, bus=bus.name, ret=-errno.EBUSY, why="already registered")
        return -errno.EBUSY
    drv.bus = bus
    bus.drivers.append(drv)
    k._emit("driver_register", driver=drv.name, bus=bus.name, ret=0)
    if bus.drivers_autoprobe:
        _dd.driver_attach(k, drv)
    _deferred.deferred_probe_extend_timeout(k)
    return 0


def driver_unregister(k: Kernel, drv: DeviceDriver) -> None:
    bus = drv.bus
    if bus is None or drv not in bus.drivers:
        return
    k._emit("driver_unregister", driver=drv.name, bus=bus.name)
    _dd.driver_detach(k, drv)
    bus.drivers.remove(drv)


def driver_find(name: str, bus: Bus) -> DeviceDriver | None:
    return next((drv for drv in bus.drivers if drv.name == name), None)


def device_set_node(dev: Device, fwnode: Hashable | None) -> None:
    """Point ``dev`` at ``fwnode`` (and its ``of_node``). Only a device that is the first registered
    with a fwnode stands for it in fw_devlink; a second one just shares the node."""
    dev.fwnode = fwnode


def device_match_fwnode(dev: Device, fwnode: Hashable | None) -> bool:
    return dev.fwnode is not None and dev.fwnode == fwnode


def _lookup_trace(k: Kernel, fn: str, fwnode: Hashable, found: Device | None, candidates: int) -> None:
    k._emit(
        "lookup",
        fn=fn,
        fwnode=fwnode_name(fwnode),
        found=found.name if found else None,
        candidates=candidates,
    )


def bus_find_device(bus: Bus, match: Callable[[Device], bool], start: Device | None = None) -> Device | None:
    """The first device on ``bus`` after ``start``, in registration order, that ``match`` accepts."""
    devices = bus.devices
    begin = devices.index(start) + 1 if start is not None and start in devices else 0
    return next((dev for dev in devices[begin:] if match(dev)), None)


def bus_find_device_by_fwnode(bus: Bus, fwnode: Hashable) -> Device | None:
    """The *first* device on ``bus`` with this fwnode. When two devices share a fwnode (a child made
    with ``device_set_node()``), this is whichever was registered first, bound or not."""
    found = bus_find_device(bus, lambda dev: device_match_fwnode(dev, fwnode))
    _lookup_trace(
        bus.kernel,
        "bus_find_device_by_fwnode",
        fwnode,
        found,
        sum(device_match_fwnode(dev, fwnode) for dev in bus.devices),
    )
    return found


def bus_find_device_by_name(bus: Bus, name: str) -> Device | None:
    return bus_find_device(bus, lambda dev: dev.name == name)


def driver_find_device(drv: DeviceDriver, match: Callable[[Device], bool]) -> Device | None:
    """The first device *bound to* ``drv`` that ``match`` accepts."""
    return next((dev for dev in drv.devices if match(dev)), None)


def driver_find_device_by_fwnode(drv: DeviceDriver, fwnode: Hashable) -> Device | None:
    found = driver_find_device(drv, lambda dev: device_match_fwnode(dev, fwnode))
    if drv.bus is not None:
        _lookup_trace(
            drv.bus.kernel,
            "driver_find_device_by_fwnode",
            fwnode,
            found,
            sum(device_match_fwnode(dev, fwnode) for dev in drv.devices),
        )
    return found
