"""Binding devices to drivers (``drivers/base/dd.c``): attach, probe, bound, release.

Return conventions follow Linux: ``really_probe()`` gives 0 when bound, a negative errno when it
stopped before the driver's probe (supplier links, ``dma_configure``) and the *positive* errno the
driver's probe returned otherwise, so the caller knows whether the next driver may try its luck.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from pkvm_smmu.host.driver_core import _deferred, _links
from pkvm_smmu.host.driver_core._errno import EPROBE_DEFER, errname
from pkvm_smmu.host.driver_core.device import Device, DeviceDriver

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core._kernel import Kernel

BUS_NOTIFY_ADD_DEVICE = "add_device"
BUS_NOTIFY_DEL_DEVICE = "del_device"
BUS_NOTIFY_REMOVED_DEVICE = "removed_device"
BUS_NOTIFY_BIND_DRIVER = "bind_driver"
BUS_NOTIFY_BOUND_DRIVER = "bound_driver"
BUS_NOTIFY_UNBIND_DRIVER = "unbind_driver"
BUS_NOTIFY_UNBOUND_DRIVER = "unbound_driver"
BUS_NOTIFY_DRIVER_NOT_BOUND = "driver_not_bound"


def _result(ret: int) -> str:
    if ret == 0:
        return "bound"
    if abs(ret) == EPROBE_DEFER:
        return "defer"
    if abs(ret) in (errno.ENODEV, errno.ENXIO):
        return "rejected"  # the driver says this device is not for it
    return "failed"


def _unbind_cleanup(dev: Device) -> None:
    dev.driver = None
    dev.driver_data = None


def driver_bound(k: Kernel, dev: Device) -> None:
    drv = dev.driver
    if drv is None or dev.bound:
        k._emit("bind.warn", device=dev.name, why="already bound")
        return
    drv.devices.append(dev)
    dev.bound = True
    _links.device_links_driver_bound(k, dev)
    _deferred.driver_deferred_probe_del(k, dev)
    k._emit("bind", device=dev.name, driver=drv.name, bus=drv.bus.name if drv.bus else None)
    _deferred.driver_deferred_probe_trigger(k)
    k.bus_notify(dev, BUS_NOTIFY_BOUND_DRIVER)


def _really_probe(k: Kernel, dev: Device, drv: DeviceDriver) -> tuple[int, str]:
    """(ret, the step that decided it)."""
    dev.deferred_probe_reason = None
    if k.defer_all_probes:
        dev.deferred_probe_reason = "all probes blocked"
        return -EPROBE_DEFER, "blocked"
    if _links.device_links_check_suppliers(k, dev) == -EPROBE_DEFER:
        return -EPROBE_DEFER, "links"
    bus = dev.bus
    assert bus is not None  # only devices on a bus reach a driver
    dev.driver = drv
    if bus.has_dma_configure:
        ret = bus.dma_configure(dev)
        if ret:
            if dev.deferred_probe_reason is None:
                dev.deferred_probe_reason = f"dma_configure: {errname(ret)}"
            _links.device_links_no_driver(k, dev)
            _unbind_cleanup(dev)
            return ret, "dma_configure"
    k.bus_notify(dev, BUS_NOTIFY_BIND_DRIVER)
    ret = bus.probe(dev)
    if ret:
        if ret == -EPROBE_DEFER and dev.deferred_probe_reason is None:
            dev.deferred_probe_reason = f"{drv.name}: probe deferred"
        k.bus_notify(dev, BUS_NOTIFY_DRIVER_NOT_BOUND)
        if bus.has_dma_configure:
            bus.dma_cleanup(dev)
        _links.device_links_no_driver(k, dev)
        _unbind_cleanup(dev)
        return -ret, "probe"
    driver_bound(k, dev)
    return 0, "probe"


def really_probe(k: Kernel, dev: Device, drv: DeviceDriver) -> int:
    with k.trace.span(k.component, "probe", device=dev.name, driver=drv.name) as fields:
        ret, stage = _really_probe(k, dev, drv)
        fields["stage"] = stage
        fields["ret"] = ret
        fields["err"] = errname(-abs(ret))
        fields["result"] = _result(ret)
        if ret:
            fields["reason"] = dev.deferred_probe_reason
    return ret


def driver_probe_device(k: Kernel, drv: DeviceDriver, dev: Device) -> int:
    """Try ``drv`` on ``dev``; a deferral puts the device on the pending list. If a bind happened
    meanwhile, trigger again so the deferral is not missed (Linux's trigger-count check)."""
    trigger_count = k.deferred_trigger_count
    if dev.dead or not dev.registered:
        return -errno.ENODEV
    if dev.driver is not None:
        return -errno.EBUSY
    dev.can_match = True
    ret = really_probe(k, dev, drv)
    if abs(ret) == EPROBE_DEFER:
        _deferred.driver_deferred_probe_add(k, dev)
        if trigger_count != k.deferred_trigger_count and not k.defer_all_probes:
            _deferred.driver_deferred_probe_trigger(k)
    return ret


def _device_attach_driver(k: Kernel, drv: DeviceDriver, dev: Device) -> int:
    """1 bound, 0 try the next driver, <0 stop looking."""
    assert dev.bus is not None
    ret = dev.bus.match(dev, drv)
    if ret == 0:
        return 0
    if ret == -EPROBE_DEFER:
        dev.can_match = True
        dev.deferred_probe_reason = f"{drv.name}: match deferred"
        _deferred.driver_deferred_probe_add(k, dev)
        return ret
    if ret < 0:
        return ret
    ret = driver_probe_device(k, drv, dev)
    if ret < 0:
        return ret
    return int(ret == 0)


def device_attach(k: Kernel, dev: Device) -> int:
    """1 if ``dev`` is (now) bound, 0 if no driver took it, ``-ENODEV`` if it is gone."""
    if dev.dead or not dev.registered or dev.bus is None:
        return -errno.ENODEV
    if dev.driver is not None:
        return 1 if dev.bound else 0
    for drv in list(dev.bus.drivers):
        ret = _device_attach_driver(k, drv, dev)
        if ret:
            return max(ret, 0)
    return 0


def bus_probe_device(k: Kernel, dev: Device) -> None:
    if dev.bus is not None and dev.bus.drivers_autoprobe:
        device_attach(k, dev)


def _driver_attach(k: Kernel, drv: DeviceDriver, dev: Device) -> None:
    assert dev.bus is not None
    ret = dev.bus.match(dev, drv)
    if ret == 0:
        return
    if ret == -EPROBE_DEFER:
        dev.can_match = True
        dev.deferred_probe_reason = f"{drv.name}: match deferred"
        _deferred.driver_deferred_probe_add(k, dev)
        return
    if ret < 0:
        return
    driver_probe_device(k, drv, dev)


def driver_attach(k: Kernel, drv: DeviceDriver) -> int:
    """Offer ``drv`` every device on its bus, in registration order."""
    if drv.bus is None:
        return -errno.EINVAL
    for dev in list(drv.bus.devices):
        _driver_attach(k, drv, dev)
    return 0


def device_release_driver_internal(k: Kernel, dev: Device, drv: DeviceDriver | None = None) -> None:
    bound = dev.driver
    if bound is None or (drv is not None and drv is not bound):
        return
    if not dev.bound:
        return  # still probing further up this call chain; Linux would block on the device lock
    if _links.device_links_busy(dev):
        _links.device_links_unbind_consumers(k, dev)
    k.bus_notify(dev, BUS_NOTIFY_UNBIND_DRIVER)
    bus = dev.bus
    if bus is not None:
        bus.remove(dev)
        if bus.has_dma_configure:
            bus.dma_cleanup(dev)
    _links.device_links_driver_cleanup(k, dev)
    _unbind_cleanup(dev)
    if dev in bound.devices:
        bound.devices.remove(dev)
    dev.bound = False
    k._emit("unbind", device=dev.name, driver=bound.name)
    k.bus_notify(dev, BUS_NOTIFY_UNBOUND_DRIVER)


def driver_detach(k: Kernel, drv: DeviceDriver) -> None:
    """Unbind ``drv`` from its devices, most recently bound first."""
    while drv.devices:
        dev = drv.devices[-1]
        device_release_driver_internal(k, dev, drv)
        if drv.devices and drv.devices[-1] is dev:
            drv.devices.pop()  # defensive: never loop on a device that would not let go
