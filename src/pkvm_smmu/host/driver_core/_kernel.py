"""The host kernel's driver core as one object: buses, devices, drivers, initcalls, deferred probe,
device links and fw_devlink. Several kernels may live in one process; nothing here is global."""

from __future__ import annotations

import errno
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pkvm_smmu.host.driver_core import _core, _dd, _deferred, _fwdevlink, _links
from pkvm_smmu.host.driver_core._devlink import DeviceLink, DeviceLinkFlags, FwnodeLink, FwnodeLinkFlags
from pkvm_smmu.host.driver_core._errno import EPROBE_DEFER, errname
from pkvm_smmu.host.driver_core._initcall import Initcall, InitcallEntry, InitcallLevel, InitcallTable
from pkvm_smmu.host.driver_core.auxiliary import AuxiliaryBus
from pkvm_smmu.host.driver_core.device import Bus, Device, DeviceDriver, DmaCleanup, DmaConfigure
from pkvm_smmu.host.driver_core.faux import FauxBus, FauxDriver
from pkvm_smmu.host.driver_core.pci import PciBus
from pkvm_smmu.host.driver_core.platform import PlatformBus
from pkvm_smmu.trace import TraceBus


def _zero_clock() -> int:
    return 0


class Kernel:
    """The driver core of one host kernel.

    ``modules`` and ``deferred_probe_timeout_s`` are ``CONFIG_MODULES`` and the
    ``deferred_probe_timeout=`` parameter (default 10 s with modules, 0 without; -1 waits forever).
    ``fw_devlink`` is the ``fw_devlink=`` parameter: ``off``, ``permissive``, ``on`` or ``rpm``.
    ``now_ns`` is the modeled clock the deferred-probe timeout runs on.
    """

    def __init__(
        self,
        trace: TraceBus | None = None,
        *,
        now_ns: Callable[[], int] | None = None,
        modules: bool = True,
        deferred_probe_timeout_s: int | None = None,
        fw_devlink: str = "on",
        component: str = "driver_core",
    ) -> None:
        if fw_devlink not in _fwdevlink.FW_DEVLINK_MODES:
            modes = ", ".join(_fwdevlink.FW_DEVLINK_MODES)
            raise ValueError(f"fw_devlink={fw_devlink!r}: expected one of {modes}")
        self.trace = trace if trace is not None else TraceBus()
        self.component = component
        self.now_ns = now_ns if now_ns is not None else _zero_clock
        self.modules = modules
        self.fw_devlink = fw_devlink
        if deferred_probe_timeout_s is None:
            deferred_probe_timeout_s = 10 if modules else 0
        self.driver_deferred_probe_timeout = deferred_probe_timeout_s
        self.system_state = "booting"

        self.initcalls = InitcallTable()
        self.devices: list[Device] = []  # every registered device, registration order
        self.platform_devid_ida = 0

        # fw_devlink state: which device stands for a fwnode, and dependencies not yet device links.
        self.fwnode_dev: dict[Hashable, Device] = {}
        self.fwnode_links: list[FwnodeLink] = []
        self.fwnode_links_added: set[Hashable] = set()
        self.fwnode_initialized: set[Hashable] = set()
        # Firmware's parser: called once per fwnode when its device is added (fwnode ops add_links).
        self.fwnode_add_links: Callable[[Hashable], None] | None = None
        self.fw_devlink_drv_reg_done = False

        # Deferred probe state (dd.c).
        self.deferred_probe_pending_list: list[Device] = []
        self.deferred_probe_active_list: list[Device] = []
        self.deferred_trigger_count = 0
        self.driver_deferred_probe_enable = False
        self.initcalls_done = False
        self.defer_all_probes = False
        self.deferred_work_running = False

        self._timers: dict[str, tuple[int, int, Callable[[], None]]] = {}
        self._timer_seq = 0
        self._depth = 0

        # driver_init(): the buses exist before any initcall runs.
        self.platform_bus = PlatformBus(self)
        self.pci_bus = PciBus(self)
        self.auxiliary_bus = AuxiliaryBus(self)
        self.faux_bus = FauxBus(self)
        self.buses: dict[str, Bus] = {
            bus.name: bus for bus in (self.platform_bus, self.pci_bus, self.auxiliary_bus, self.faux_bus)
        }
        self.faux_bus_root = Device("faux")
        self.device_add(self.faux_bus_root)
        self.faux_driver = FauxDriver("faux_driver", suppress_bind_attrs=True)
        self.driver_register(self.faux_driver, self.faux_bus)
        self.register_initcall(
            InitcallLevel.LATE, lambda: _deferred.deferred_probe_initcall(self), "deferred_probe_initcall"
        )

    # -- plumbing --------------------------------------------------------------------------------

    def _emit(self, kind: str, /, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(self.component, kind, **fields)

    @contextmanager
    def _entry(self) -> Iterator[None]:
        """Brackets a public driver-core call; when the outermost one returns, queued deferred-probe
        work and due timers run (Linux runs them on workqueues, soon after)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0:
            self._run_pending()

    def _run_pending(self) -> None:
        self._depth += 1
        try:
            while True:
                if self.deferred_probe_active_list and not self.deferred_work_running:
                    _deferred.deferred_probe_work_func(self)
                    continue
                if not self._fire_one_due_timer():
                    break
        finally:
            self._depth -= 1

    def bus_notify(self, dev: Device, event: str) -> None:
        if dev.bus is not None:
            for notifier in list(dev.bus.notifiers):
                notifier(event, dev)

    # -- timers (delayed work on the modeled clock) -----------------------------------------------

    def schedule_delayed_work(self, name: str, fn: Callable[[], None], delay_ns: int) -> None:
        self._timer_seq += 1
        self._timers[name] = (self.now_ns() + delay_ns, self._timer_seq, fn)
        self._emit("timer.schedule", name=name, deadline_ns=self._timers[name][0])

    def cancel_delayed_work(self, name: str) -> bool:
        return self._timers.pop(name, None) is not None

    def timer_deadline_ns(self, name: str) -> int | None:
        entry = self._timers.get(name)
        return entry[0] if entry else None

    def _fire_one_due_timer(self) -> bool:
        now = self.now_ns()
        due = [(deadline, seq, name) for name, (deadline, seq, _) in self._timers.items() if deadline <= now]
        if not due:
            return False
        _, _, name = min(due)
        _, _, fn = self._timers.pop(name)
        self._emit("timer.fire", name=name)
        fn()
        return True

    def run_timers(self) -> None:
        """Fire the delayed work whose deadline the modeled clock has passed."""
        with self._entry():
            pass

    # -- initcalls ---------------------------------------------------------------------------------

    def register_initcall(self, level: InitcallLevel | str, fn: Initcall, name: str | None = None) -> None:
        self.initcalls.register(level, fn, name)

    def module_init(self, fn: Initcall, name: str | None = None) -> None:
        """Built in, ``module_init()`` is ``device_initcall()``."""
        self.register_initcall(InitcallLevel.DEVICE, fn, name)

    def _do_one_initcall(self, entry: InitcallEntry) -> None:
        with (
            self._entry(),
            self.trace.span(
                self.component, "initcall", level=entry.level.linux_name, fn=entry.name
            ) as fields,
        ):
            ret = entry.fn()
            fields["ret"] = ret
            if ret:
                fields["err"] = errname(ret)  # logged, never fatal

    def run_initcalls(self, until: InitcallLevel | str | None = None) -> None:
        """Run the initcall levels not yet run, through ``until`` (default: all of them)."""
        last = InitcallLevel.parse(until) if until is not None else None
        self.initcalls.run(self._do_one_initcall, last)
        if self.initcalls.done and self.system_state == "booting":
            self.system_state = "running"
            self._emit("system_state", state="running")

    # -- devices and drivers -----------------------------------------------------------------------

    def device_add(self, dev: Device) -> int:
        with self._entry():
            return _core.device_add(self, dev)

    device_register = device_add

    def device_del(self, dev: Device) -> None:
        with self._entry():
            _core.device_del(self, dev)

    device_unregister = device_del

    def driver_register(self, drv: DeviceDriver, bus: Bus | None = None) -> int:
        target = bus if bus is not None else drv.bus
        if target is None:
            return -errno.EINVAL
        with self._entry():
            return _core.driver_register(self, drv, target)

    def driver_unregister(self, drv: DeviceDriver) -> None:
        with self._entry():
            _core.driver_unregister(self, drv)

    def device_attach(self, dev: Device) -> int:
        with self._entry():
            return _dd.device_attach(self, dev)

    def bus_probe_device(self, dev: Device) -> None:
        with self._entry():
            _dd.bus_probe_device(self, dev)

    def driver_attach(self, drv: DeviceDriver) -> int:
        with self._entry():
            return _dd.driver_attach(self, drv)

    def device_release_driver(self, dev: Device) -> None:
        with self._entry():
            _dd.device_release_driver_internal(self, dev)

    def device_driver_attach(self, drv: DeviceDriver, dev: Device) -> int:
        """Bind ``drv`` to ``dev`` by hand; no deferred-list entry, ``-EAGAIN`` for a deferral."""
        with self._entry():
            if dev.dead or not dev.registered:
                return -errno.ENODEV
            if dev.driver is not None:
                return -errno.EBUSY
            dev.can_match = True
            ret = -abs(_dd.really_probe(self, dev, drv))
            return -errno.EAGAIN if ret == -EPROBE_DEFER else ret

    def bind_store(self, drv: DeviceDriver, dev: Device) -> int:
        """``echo <dev> > /sys/bus/<bus>/drivers/<drv>/bind``."""
        if drv.suppress_bind_attrs:
            return -errno.ENOENT  # the file does not exist
        if dev.bus is None or dev.bus is not drv.bus or dev.bus.match(dev, drv) <= 0:
            return -errno.ENODEV
        return self.device_driver_attach(drv, dev)

    def unbind_store(self, drv: DeviceDriver, dev: Device) -> int:
        """``echo <dev> > /sys/bus/<bus>/drivers/<drv>/unbind``."""
        if drv.suppress_bind_attrs:
            return -errno.ENOENT
        if dev.driver is not drv:
            return -errno.ENODEV
        self.device_release_driver(dev)
        return 0

    def dev_err_probe(self, dev: Device, err: int, reason: str) -> int:
        """What a probe returns through: a deferral records why (debugfs ``devices_deferred``)."""
        if err == -EPROBE_DEFER:
            drv = dev.driver.name if dev.driver else (dev.bus.name if dev.bus else "")
            dev.deferred_probe_reason = f"{drv}: {reason}"
        self._emit("dev_err_probe", device=dev.name, err=errname(err), reason=reason)
        return err

    def register_dma_configure(self, fn: DmaConfigure, buses: Iterable[Bus] | None = None) -> None:
        """Install the ``bus->dma_configure`` step (the IOMMU core's) on every bus that has one."""
        for bus in buses if buses is not None else self.buses.values():
            if bus.has_dma_configure:
                bus.dma_configure_hooks.append(fn)

    def register_dma_cleanup(self, fn: DmaCleanup, buses: Iterable[Bus] | None = None) -> None:
        for bus in buses if buses is not None else self.buses.values():
            if bus.has_dma_configure:
                bus.dma_cleanup_hooks.append(fn)

    # -- device links and fw_devlink ---------------------------------------------------------------

    def device_link_add(
        self, consumer: Device, supplier: Device, flags: DeviceLinkFlags | int
    ) -> DeviceLink | None:
        return _links.device_link_add(self, consumer, supplier, DeviceLinkFlags(flags))

    def device_link_del(self, link: DeviceLink) -> None:
        _links.device_link_del(self, link)

    def device_link_remove(self, consumer: Device, supplier: Device) -> None:
        _links.device_link_remove(self, consumer, supplier)

    def fwnode_link_add(
        self, consumer: Hashable, supplier: Hashable, flags: FwnodeLinkFlags | int = 0
    ) -> int:
        """Firmware says ``consumer`` depends on ``supplier``; add it before the consumer's device."""
        return _fwdevlink.fwnode_link_add(self, consumer, supplier, FwnodeLinkFlags(flags))

    def fwnode_dev_initialized(self, fwnode: Hashable, initialized: bool = True) -> None:
        """The node was set up without a device (an early irqchip or clock): never wait for one."""
        if initialized:
            self.fwnode_initialized.add(fwnode)
        else:
            self.fwnode_initialized.discard(fwnode)

    def get_dev_from_fwnode(self, fwnode: Hashable) -> Device | None:
        """The device that stands for ``fwnode`` in fw_devlink: the first registered with it."""
        return self.fwnode_dev.get(fwnode)

    def fw_devlink_drivers_done(self) -> None:
        _fwdevlink.fw_devlink_drivers_done(self)

    # -- deferred probe ----------------------------------------------------------------------------

    def driver_deferred_probe_add(self, dev: Device) -> None:
        _deferred.driver_deferred_probe_add(self, dev)

    def driver_deferred_probe_trigger(self) -> None:
        _deferred.driver_deferred_probe_trigger(self)

    def driver_deferred_probe_check_state(self, dev: Device) -> int:
        return _deferred.driver_deferred_probe_check_state(self, dev)

    @property
    def deferred_devices(self) -> list[tuple[Device, str | None]]:
        """debugfs ``devices_deferred``: what waits on the pending list, and why."""
        return [(dev, dev.deferred_probe_reason) for dev in self.deferred_probe_pending_list]

    def wait_for_device_probe(self) -> None:
        """Let queued deferred-probe work finish (a no-op when called from inside it)."""
        _deferred.deferred_probe_work_func(self)

    def device_block_probing(self) -> None:
        self.defer_all_probes = True

    def device_unblock_probing(self) -> None:
        self.defer_all_probes = False
        with self._entry():
            _deferred.driver_deferred_probe_trigger(self)
