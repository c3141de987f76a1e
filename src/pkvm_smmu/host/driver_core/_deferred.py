"""Deferred probe (``drivers/base/dd.c``).

A device whose probe returned ``-EPROBE_DEFER`` waits on the *pending* list. Every successful bind
*triggers* a retry: the pending list moves to the *active* list, which the deferred-probe work then
probes again. As in Linux, triggers do nothing until ``deferred_probe_initcall`` (a ``late_initcall``)
enables them, so nothing deferred before ``late_initcall`` is retried before it.

The work runs when the outermost driver-core call returns (Linux queues it on a workqueue), so
results do not depend on thread timing. After ``late_initcall``, ``driver_deferred_probe_check_state``
tells optional dependencies to give up once the deferred-probe timeout has fired (or at once,
without modules).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from pkvm_smmu.host.driver_core._errno import EPROBE_DEFER, errname
from pkvm_smmu.host.driver_core._fwdevlink import fw_devlink_drivers_done
from pkvm_smmu.host.driver_core.device import Device

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core._kernel import Kernel

DEFERRED_PROBE_TIMEOUT_WORK = "deferred_probe_timeout_work"
NS_PER_S = 1_000_000_000


def driver_deferred_probe_add(k: Kernel, dev: Device) -> None:
    if not dev.can_match:
        return  # no driver ever matched: nothing to retry until one registers
    if dev in k.deferred_probe_pending_list or dev in k.deferred_probe_active_list:
        return
    k.deferred_probe_pending_list.append(dev)
    k._emit("defer", device=dev.name, reason=dev.deferred_probe_reason)


def driver_deferred_probe_del(k: Kernel, dev: Device) -> None:
    for queue in (k.deferred_probe_pending_list, k.deferred_probe_active_list):
        if dev in queue:
            queue.remove(dev)
    dev.deferred_probe_reason = None


def driver_deferred_probe_trigger(k: Kernel) -> None:
    if not k.driver_deferred_probe_enable:
        return
    k.deferred_trigger_count += 1
    moved = [dev.name for dev in k.deferred_probe_pending_list]
    k.deferred_probe_active_list.extend(k.deferred_probe_pending_list)
    k.deferred_probe_pending_list.clear()
    k._emit("deferred.trigger", count=k.deferred_trigger_count, devices=moved)


def deferred_probe_work_func(k: Kernel) -> None:
    """Retry every device on the active list. Re-entry (a flush from inside a retry) is a no-op:
    the running loop picks up whatever was added."""
    if k.deferred_work_running:
        return
    k.deferred_work_running = True
    try:
        while k.deferred_probe_active_list:
            dev = k.deferred_probe_active_list.pop(0)
            dev.deferred_probe_reason = None
            k._emit("deferred.retry", device=dev.name)
            k.bus_probe_device(dev)
    finally:
        k.deferred_work_running = False


def driver_deferred_probe_check_state(k: Kernel, dev: Device) -> int:
    """For an optional dependency that is missing: ``-EPROBE_DEFER`` while waiting still makes
    sense, ``-ENODEV`` after the initcalls without modules, ``-ETIMEDOUT`` once the timeout fired."""
    ret = -EPROBE_DEFER
    if not k.modules and k.initcalls_done:
        ret = -errno.ENODEV  # "ignoring dependency for device, assuming no driver"
    elif k.driver_deferred_probe_timeout == 0 and k.initcalls_done:
        ret = -errno.ETIMEDOUT  # "deferred probe timeout, ignoring dependency"
    k._emit("deferred.check_state", device=dev.name, ret=ret, err=errname(ret))
    return ret


def deferred_probe_timeout_work_func(k: Kernel) -> None:
    fw_devlink_drivers_done(k)
    k.driver_deferred_probe_timeout = 0
    k._emit("deferred.timeout", pending=[dev.name for dev in k.deferred_probe_pending_list])
    driver_deferred_probe_trigger(k)
    deferred_probe_work_func(k)
    for dev in k.deferred_probe_pending_list:
        k._emit("deferred.pending", device=dev.name, reason=dev.deferred_probe_reason)


def deferred_probe_extend_timeout(k: Kernel) -> None:
    """A driver registered while the timeout runs: give it the full timeout again."""
    if k.driver_deferred_probe_timeout <= 0:
        return
    if k.cancel_delayed_work(DEFERRED_PROBE_TIMEOUT_WORK):
        k.schedule_delayed_work(
            DEFERRED_PROBE_TIMEOUT_WORK,
            lambda: deferred_probe_timeout_work_func(k),
            k.driver_deferred_probe_timeout * NS_PER_S,
        )


def deferred_probe_initcall(k: Kernel) -> int:
    """The ``late_initcall`` that turns deferred probing on and sorts out what it can."""
    k.driver_deferred_probe_enable = True
    k._emit("deferred.enable")
    driver_deferred_probe_trigger(k)
    deferred_probe_work_func(k)
    k.initcalls_done = True
    if not k.modules:
        fw_devlink_drivers_done(k)
    # Again: with initcalls done, optional dependencies may now be given up on.
    driver_deferred_probe_trigger(k)
    deferred_probe_work_func(k)
    if k.driver_deferred_probe_timeout > 0:
        k.schedule_delayed_work(
            DEFERRED_PROBE_TIMEOUT_WORK,
            lambda: deferred_probe_timeout_work_func(k),
            k.driver_deferred_probe_timeout * NS_PER_S,
        )
    return 0
