"""After late_initcall, optional dependencies are given up on: at once without modules, after the
deferred-probe timeout with them. ``driver_deferred_probe_check_state()`` is how a subsystem (the
IOMMU core) asks; fw_devlink links to suppliers no driver matched are relaxed at the same point."""

from __future__ import annotations

import errno

from driver_core_helpers import Booted, Node, RecordingDriver, make_kernel

from pkvm_smmu.host.driver_core import (
    DL_FLAG_SYNC_STATE_ONLY,
    EPROBE_DEFER,
    Device,
    PlatformDevice,
    platform_device_register,
    platform_driver_register,
)

SMMU = Node("/smmu@2b400000", ("arm,smmu-v3",))
NIC = Node("/ethernet@1c000000", ("vendor,nic",))
S = 1_000_000_000


def optional_iommu(b: Booted) -> list[int]:
    """An of_dma_configure() stand-in whose IOMMU never registers: it asks the driver core whether
    to keep waiting, and lets the device probe without an IOMMU once told not to."""
    answers: list[int] = []

    def hook(dev: Device) -> int:
        ret = b.kernel.driver_deferred_probe_check_state(dev)
        answers.append(ret)
        return -EPROBE_DEFER if ret == -EPROBE_DEFER else 0

    b.kernel.register_dma_configure(hook)
    return answers


def _nic(b: Booted) -> tuple[PlatformDevice, RecordingDriver]:
    drv = RecordingDriver("nic", compatible="vendor,nic")
    b.kernel.module_init(lambda: platform_driver_register(b.kernel, drv))
    nic = PlatformDevice(dev_name="nic", fwnode=NIC)
    platform_device_register(b.kernel, nic)
    return nic, drv


def test_timeout_lets_a_device_with_a_missing_optional_supplier_probe() -> None:
    b = make_kernel()  # modules: 10 s timeout
    answers = optional_iommu(b)
    nic, drv = _nic(b)
    b.kernel.run_initcalls()
    assert nic.driver is None and set(answers) == {-EPROBE_DEFER}
    deadline = b.kernel.timer_deadline_ns("deferred_probe_timeout_work")
    assert deadline == 10 * S

    b.clock.now_ns = 10 * S - 1
    b.kernel.run_timers()
    assert nic.driver is None  # not yet

    b.clock.now_ns = 10 * S
    b.kernel.run_timers()
    assert answers[-1] == -errno.ETIMEDOUT
    assert nic.driver is drv and drv.probed == ["nic"]
    assert b.events("deferred.timeout")[0].fields["pending"] == ["nic"]
    assert b.kernel.driver_deferred_probe_check_state(nic) == -errno.ETIMEDOUT


def test_without_modules_optional_suppliers_are_dropped_at_late_initcall() -> None:
    b = make_kernel(modules=False)
    answers = optional_iommu(b)
    nic, drv = _nic(b)
    b.kernel.run_initcalls(until="device_sync")
    assert nic.driver is None and answers == [-EPROBE_DEFER]
    b.kernel.run_initcalls()
    assert answers[-1] == -errno.ENODEV and nic.driver is drv
    assert b.kernel.timer_deadline_ns("deferred_probe_timeout_work") is None


def test_timeout_minus_one_waits_forever() -> None:
    b = make_kernel(deferred_probe_timeout_s=-1)
    optional_iommu(b)
    nic, _ = _nic(b)
    b.kernel.run_initcalls()
    b.clock.now_ns = 3600 * S
    b.kernel.run_timers()
    assert nic.driver is None and b.kernel.driver_deferred_probe_check_state(nic) == -EPROBE_DEFER


def test_a_driver_registered_during_the_timeout_extends_it() -> None:
    b = make_kernel()
    b.kernel.run_initcalls()
    b.clock.now_ns = 4 * S
    platform_driver_register(b.kernel, RecordingDriver("late-module"))
    assert b.kernel.timer_deadline_ns("deferred_probe_timeout_work") == 14 * S


def test_timeout_relaxes_links_to_suppliers_no_driver_matched_but_not_to_deferring_ones() -> None:
    b = make_kernel()
    k = b.kernel
    other = Node("/dma@1000", ("vendor,dma",))
    uart = Node("/uart@2000", ("vendor,uart",))
    k.fwnode_link_add(NIC, SMMU)  # nothing will ever drive the SMMU
    k.fwnode_link_add(uart, other)  # the DMA controller's driver defers forever
    nic, nic_drv = _nic(b)
    uart_drv = RecordingDriver("uart", compatible="vendor,uart")
    dma_drv = RecordingDriver("dma", compatible="vendor,dma", results=[-EPROBE_DEFER] * 100)
    k.module_init(lambda: platform_driver_register(k, uart_drv))
    k.module_init(lambda: platform_driver_register(k, dma_drv))
    uart_dev = PlatformDevice(dev_name="uart", fwnode=uart)
    for dev in (
        PlatformDevice(dev_name="smmu", fwnode=SMMU),
        PlatformDevice(dev_name="dma", fwnode=other),
        uart_dev,
    ):
        platform_device_register(k, dev)
    k.run_initcalls()
    assert nic.driver is None and uart_dev.driver is None

    b.clock.now_ns = 10 * S
    k.run_timers()
    assert nic.driver is nic_drv  # its supplier never matched a driver: link relaxed
    assert uart_dev.driver is None  # its supplier has a driver that keeps deferring
    (relaxed,) = nic.links.suppliers
    assert relaxed.flags & DL_FLAG_SYNC_STATE_ONLY
    assert [(e.fields["consumer"], e.fields["supplier"]) for e in b.events("link.relax")] == [("nic", "smmu")]
    pending = [e.fields["device"] for e in b.events("deferred.pending")]
    assert pending == ["dma", "uart"] or pending == ["uart", "dma"]
