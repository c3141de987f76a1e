"""Platform devices: naming, resources, match order (override, OF, id table, name) and the
``module_platform_driver()`` helper."""

from __future__ import annotations

import errno

from driver_core_helpers import Node, RecordingDriver, booted_kernel, make_kernel

from pkvm_smmu.host.driver_core import (
    DEFINE_RES_IRQ,
    DEFINE_RES_MEM,
    EPROBE_DEFER,
    IORESOURCE_IRQ,
    IORESOURCE_MEM,
    PLATFORM_DEVID_AUTO,
    OfDeviceId,
    PlatformDevice,
    PlatformDeviceId,
    PlatformDriver,
    module_platform_driver,
    of_device_get_match_data,
    platform_device_register,
    platform_driver_register,
    platform_get_irq,
    platform_get_irq_byname,
    platform_get_resource,
    platform_get_resource_byname,
    resource_size,
)


def test_names() -> None:
    b = booted_kernel()
    k = b.kernel
    plain, numbered = PlatformDevice("serial"), PlatformDevice("serial", 3)
    auto0, auto1 = PlatformDevice("gpio", PLATFORM_DEVID_AUTO), PlatformDevice("gpio", PLATFORM_DEVID_AUTO)
    dt = PlatformDevice(dev_name="2b400000.iommu", fwnode=Node("/smmu@2b400000"))
    for dev in (plain, numbered, auto0, auto1, dt):
        assert platform_device_register(k, dev) == 0
    assert [d.name for d in (plain, numbered, auto0, auto1, dt)] == [
        "serial",
        "serial.3",
        "gpio.0.auto",
        "gpio.1.auto",
        "2b400000.iommu",
    ]


def test_resources() -> None:
    pdev = PlatformDevice(
        "arm-smmu-v3",
        resources=[
            DEFINE_RES_MEM(0x2B40_0000, 0x2_0000),
            DEFINE_RES_IRQ(74, "eventq"),
            DEFINE_RES_MEM(0x2B50_0000, 0x1000, "pmcg"),
            DEFINE_RES_IRQ(75, "gerror"),
        ],
    )
    mem0 = platform_get_resource(pdev, IORESOURCE_MEM, 0)
    assert mem0 is not None and (mem0.start, mem0.end, resource_size(mem0)) == (
        0x2B40_0000,
        0x2B41_FFFF,
        0x2_0000,
    )
    mem1 = platform_get_resource(pdev, IORESOURCE_MEM, 1)
    assert mem1 is not None and mem1.name == "pmcg"
    assert platform_get_resource(pdev, IORESOURCE_MEM, 2) is None
    assert platform_get_resource(pdev, IORESOURCE_IRQ, 1) == DEFINE_RES_IRQ(75, "gerror")
    assert platform_get_irq(pdev, 0) == 74 and platform_get_irq(pdev, 2) == -errno.ENXIO
    assert (
        platform_get_irq_byname(pdev, "gerror") == 75
        and platform_get_irq_byname(pdev, "priq") == -errno.ENXIO
    )
    pmcg = platform_get_resource_byname(pdev, IORESOURCE_MEM, "pmcg")
    assert pmcg is not None and pmcg.start == 0x2B50_0000


def test_match_order_override_then_of_then_id_table_then_name() -> None:
    b = booted_kernel()
    k = b.kernel
    by_name = RecordingDriver("serial")
    by_id = PlatformDriver("ids", lambda p: 0, id_table=[PlatformDeviceId("uart")])
    by_of = PlatformDriver("of", lambda p: 0, of_match_table=["vendor,old", OfDeviceId("vendor,new", data=2)])
    forced = RecordingDriver("forced")
    for drv in (by_name, by_id, by_of, forced):
        platform_driver_register(k, drv)
    devs = {
        "serial": PlatformDevice("serial"),
        "uart": PlatformDevice("uart"),
        "of": PlatformDevice(dev_name="of", fwnode=Node("/x", ("vendor,new", "vendor,old"))),
    }
    override = PlatformDevice("serial", 1)
    override.driver_override = "forced"
    for dev in (*devs.values(), override):
        platform_device_register(k, dev)
    assert devs["serial"].driver is by_name
    assert devs["uart"].driver is by_id
    assert devs["of"].driver is by_of and of_device_get_match_data(devs["of"]) == 2
    assert override.driver is forced


def test_module_platform_driver_registers_at_device_initcall() -> None:
    b = make_kernel()
    k = b.kernel
    drv = RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3")
    module_platform_driver(k, drv)
    pdev = PlatformDevice(dev_name="smmu", fwnode=Node("/smmu", ("arm,smmu-v3",)))
    platform_device_register(k, pdev)
    k.run_initcalls(until="rootfs_sync")
    assert pdev.driver is None
    k.run_initcalls(until="device")
    assert pdev.driver is drv
    spans = [e.fields for e in b.events("initcall") if e.fields["fn"] == "arm-smmu-v3_init"]
    assert spans == [{"level": "device_initcall", "fn": "arm-smmu-v3_init", "ret": 0}]


def test_prevent_deferred_probe_turns_a_deferral_into_a_failure() -> None:
    b = booted_kernel()
    k = b.kernel
    drv = PlatformDriver("strict", lambda p: -EPROBE_DEFER, prevent_deferred_probe=True)
    platform_driver_register(k, drv)
    platform_device_register(k, PlatformDevice("strict"))
    assert k.deferred_devices == []
    assert b.probes("strict")[0]["ret"] == errno.ENXIO
