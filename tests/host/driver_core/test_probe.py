"""Binding: on device add, on driver registration, match order, failures, unbind, and deferral —
retried at late_initcall and after every bind once deferred probing is on, never before."""

from __future__ import annotations

import errno

from driver_core_helpers import Node, RecordingDriver, booted_kernel, make_kernel

from pkvm_smmu.host.driver_core import (
    EPROBE_DEFER,
    Kernel,
    PlatformDevice,
    platform_device_register,
    platform_driver_register,
    platform_driver_unregister,
)

SMMU = Node("/smmu@2b400000", ("arm,smmu-v3",))


def test_device_added_after_its_driver_binds_at_once() -> None:
    b = booted_kernel()
    drv = RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3")
    assert platform_driver_register(b.kernel, drv) == 0
    pdev = PlatformDevice(dev_name="2b400000.iommu", fwnode=SMMU)
    assert platform_device_register(b.kernel, pdev) == 0
    assert drv.probed == ["2b400000.iommu"]
    assert pdev.driver is drv and pdev.bound and drv.devices == [pdev]
    assert pdev.driver_data == "arm-smmu-v3-data"
    assert b.probes("2b400000.iommu") == [
        {
            "device": "2b400000.iommu",
            "driver": "arm-smmu-v3",
            "stage": "probe",
            "ret": 0,
            "err": "0",
            "result": "bound",
        }
    ]
    assert [e.fields["device"] for e in b.events("bind")] == ["2b400000.iommu"]


def test_driver_registration_walks_unbound_matching_devices_in_registration_order() -> None:
    b = booted_kernel()
    nodes = [Node(f"/dev{i}", ("vendor,thing",)) for i in range(3)]
    devs = [PlatformDevice(dev_name=f"dev{i}", fwnode=n) for i, n in enumerate(nodes)]
    other = PlatformDevice(dev_name="other", fwnode=Node("/other", ("vendor,other",)))
    for dev in (devs[2], other, devs[0], devs[1]):
        platform_device_register(b.kernel, dev)
    assert all(dev.driver is None for dev in devs)
    drv = RecordingDriver("thing", compatible="vendor,thing")
    platform_driver_register(b.kernel, drv)
    assert drv.probed == ["dev2", "dev0", "dev1"]
    assert other.driver is None


def test_first_registered_matching_driver_wins_and_a_rejecting_probe_lets_the_next_try() -> None:
    b = booted_kernel()
    picky = RecordingDriver("picky", compatible="vendor,thing", results=[-errno.ENODEV])
    generic = RecordingDriver("generic", compatible="vendor,thing")
    late = RecordingDriver("late", compatible="vendor,thing")
    for drv in (picky, generic, late):
        platform_driver_register(b.kernel, drv)
    pdev = PlatformDevice(dev_name="dev", fwnode=Node("/dev", ("vendor,thing",)))
    platform_device_register(b.kernel, pdev)
    assert (picky.probed, generic.probed, late.probed) == (["dev"], ["dev"], [])
    assert pdev.driver is generic
    assert [p["result"] for p in b.probes("dev")] == ["rejected", "bound"]


def test_failed_probe_leaves_the_device_unbound_undeferred_and_clean() -> None:
    b = booted_kernel()
    drv = RecordingDriver("broken", compatible="vendor,thing", results=[-errno.EIO])
    platform_driver_register(b.kernel, drv)
    pdev = PlatformDevice(dev_name="dev", fwnode=Node("/dev", ("vendor,thing",)))
    pdev.driver_data = "stale"
    platform_device_register(b.kernel, pdev)
    assert pdev.driver is None and not pdev.bound and pdev.driver_data is None
    assert b.kernel.deferred_devices == []
    assert b.probes("dev")[0]["result"] == "failed"
    assert b.probes("dev")[0]["ret"] == errno.EIO  # a probe error comes back positive, as in Linux


def test_deferral_before_late_initcall_waits_for_late_initcall_even_if_others_bind() -> None:
    b = make_kernel()
    k = b.kernel
    smmu = RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3", results=[-EPROBE_DEFER])
    other = RecordingDriver("other", compatible="vendor,other")
    k.module_init(lambda: platform_driver_register(k, smmu))
    k.module_init(lambda: platform_driver_register(k, other))
    platform_device_register(k, PlatformDevice(dev_name="smmu", fwnode=SMMU))
    platform_device_register(k, PlatformDevice(dev_name="other", fwnode=Node("/o", ("vendor,other",))))

    k.run_initcalls(until="device_sync")
    assert smmu.probed == ["smmu"]  # deferred ...
    assert other.probed == ["other"]  # ... and a later bind did not retry it: triggers are off
    assert [dev.name for dev, _ in k.deferred_devices] == ["smmu"]
    assert b.events("deferred.trigger") == []

    k.run_initcalls(until="late")
    assert smmu.probed == ["smmu", "smmu"]
    assert k.deferred_devices == []
    assert k.platform_bus.devices[0].driver is smmu


def test_after_late_initcall_every_bind_retries_the_deferred_devices() -> None:
    b = booted_kernel()
    k = b.kernel
    ready = {"kvm": False}
    smmu = RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3")
    smmu.before_probe = lambda _: None
    smmu.results = []

    def probe_gate(pdev: PlatformDevice) -> int:
        smmu.probed.append(pdev.name)
        return 0 if ready["kvm"] else -EPROBE_DEFER

    smmu.probe = probe_gate
    platform_driver_register(k, smmu)
    smmu_dev = PlatformDevice(dev_name="smmu", fwnode=SMMU)
    platform_device_register(k, smmu_dev)
    assert smmu_dev.driver is None and len(smmu.probed) == 1

    # An unrelated bind retries it (and it defers again while the gate is shut).
    other = RecordingDriver("other", compatible="vendor,other")
    platform_driver_register(k, other)
    platform_device_register(k, PlatformDevice(dev_name="o1", fwnode=Node("/o1", ("vendor,other",))))
    assert len(smmu.probed) == 2 and smmu_dev.driver is None

    ready["kvm"] = True
    platform_device_register(k, PlatformDevice(dev_name="o2", fwnode=Node("/o2", ("vendor,other",))))
    assert len(smmu.probed) == 3 and smmu_dev.driver is smmu
    retried = [e.fields["device"] for e in b.events("deferred.retry")]
    assert retried == ["smmu", "smmu"]


def test_deferral_trace_tells_the_story_in_order() -> None:
    b = make_kernel()
    k = b.kernel
    drv = RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3", results=[-EPROBE_DEFER])
    k.module_init(lambda: platform_driver_register(k, drv))
    platform_device_register(k, PlatformDevice(dev_name="smmu", fwnode=SMMU))
    k.run_initcalls()
    story = [
        (e.kind, e.fields.get("result"))
        for e in b.sink
        if e.fields.get("device") == "smmu" or e.kind == "deferred.trigger"
    ]
    assert story == [
        ("device_add", None),
        ("probe", "defer"),
        ("defer", None),
        ("deferred.trigger", None),
        ("deferred.retry", None),
        ("bind", None),
        ("deferred.trigger", None),  # the bind's own trigger, inside the probe span ...
        ("probe", "bound"),  # ... which is delivered when the probe returns
        ("deferred.trigger", None),  # deferred_probe_initcall's second pass
    ]
    defer = b.events("defer")[0]
    assert defer.fields["reason"] == "arm-smmu-v3: probe deferred"


def test_dev_err_probe_records_the_reason_the_trace_reports() -> None:
    b = booted_kernel()
    k = b.kernel
    drv = RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3")
    drv.probe = lambda pdev: k.dev_err_probe(pdev, -EPROBE_DEFER, "pKVM not initialised")
    platform_driver_register(k, drv)
    platform_device_register(k, PlatformDevice(dev_name="smmu", fwnode=SMMU))
    assert k.deferred_devices[0][1] == "arm-smmu-v3: pKVM not initialised"
    assert b.events("defer")[0].fields["reason"] == "arm-smmu-v3: pKVM not initialised"
    assert b.probes("smmu")[0]["reason"] == "arm-smmu-v3: pKVM not initialised"


def test_release_and_driver_unregister_call_remove_and_allow_rebinding() -> None:
    b = booted_kernel()
    k = b.kernel
    drv = RecordingDriver("thing", compatible="vendor,thing")
    platform_driver_register(k, drv)
    devs = [PlatformDevice(dev_name=f"d{i}", fwnode=Node(f"/d{i}", ("vendor,thing",))) for i in range(2)]
    for dev in devs:
        platform_device_register(k, dev)
    k.device_release_driver(devs[0])
    assert drv.removed == ["d0"] and devs[0].driver is None and devs[0].driver_data is None
    assert k.device_attach(devs[0]) == 1 and drv.probed == ["d0", "d1", "d0"]
    platform_driver_unregister(k, drv)
    assert drv.removed == ["d0", "d0", "d1"]  # driver_detach: most recently bound first
    assert all(dev.driver is None for dev in devs)
    assert [e.fields["device"] for e in b.events("unbind")] == ["d0", "d0", "d1"]


def test_sysfs_bind_files_respect_suppress_bind_attrs() -> None:
    b = booted_kernel()
    k = b.kernel
    drv = RecordingDriver("thing", compatible="vendor,thing")
    drv.suppress_bind_attrs = True
    platform_driver_register(k, drv)
    dev = PlatformDevice(dev_name="d", fwnode=Node("/d", ("vendor,thing",)))
    platform_device_register(k, dev)
    assert k.unbind_store(drv, dev) == -errno.ENOENT and dev.driver is drv
    drv.suppress_bind_attrs = False
    assert k.unbind_store(drv, dev) == 0 and dev.driver is None
    assert k.bind_store(drv, dev) == 0 and dev.driver is drv


def test_registration_errors() -> None:
    b = booted_kernel()
    k = b.kernel
    drv = RecordingDriver("thing")
    assert platform_driver_register(k, drv) == 0
    assert platform_driver_register(k, RecordingDriver("thing")) == -errno.EBUSY
    assert k.driver_register(RecordingDriver("aux-bus-mismatch"), k.auxiliary_bus) == -errno.EINVAL
    assert platform_device_register(k, PlatformDevice("serial", 0)) == 0
    assert platform_device_register(k, PlatformDevice("serial", 0)) == -errno.EEXIST
    assert k.device_add(PlatformDevice()) == -errno.EINVAL  # no name


def test_kernels_are_independent() -> None:
    first, second = Kernel(), Kernel()
    drv = RecordingDriver("thing", compatible="vendor,thing")
    platform_driver_register(first, drv)
    platform_device_register(second, PlatformDevice(dev_name="d", fwnode=Node("/d", ("vendor,thing",))))
    assert drv.probed == []
    assert second.platform_bus.drivers == [] and first.platform_bus.devices == []
