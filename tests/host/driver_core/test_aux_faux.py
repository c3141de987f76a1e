"""Auxiliary devices (named ``<modname>.<devname>.<id>``, bound by id table) and faux devices
(bound the moment they are created, or not created at all)."""

from __future__ import annotations

import errno

from driver_core_helpers import Node, RecordingDriver, booted_kernel

from pkvm_smmu.host.driver_core import (
    EPROBE_DEFER,
    AuxiliaryDevice,
    AuxiliaryDeviceId,
    AuxiliaryDriver,
    FauxDevice,
    PlatformDevice,
    auxiliary_device_add,
    auxiliary_device_init,
    auxiliary_driver_register,
    faux_device_create,
    faux_device_destroy,
    platform_device_register,
    platform_driver_register,
)

SMMU = Node("/smmu@2b400000", ("arm,smmu-v3",))


def test_pkvm_driver_spawns_an_aux_device_the_smmu_driver_binds_by_id_table() -> None:
    b = booted_kernel()
    k = b.kernel
    bound: list[tuple[str, str, str | None]] = []

    def smmu_probe(auxdev: AuxiliaryDevice, entry: AuxiliaryDeviceId) -> int:
        parent = auxdev.parent.name if auxdev.parent else None
        bound.append((auxdev.name, entry.name, parent))
        return 0

    smmu_aux = AuxiliaryDriver("emulated", smmu_probe, ["arm_smmu_v3_kvm.smmu"])
    assert auxiliary_driver_register(k, smmu_aux, "arm_smmu_v3") == 0
    assert smmu_aux.name == "arm_smmu_v3.emulated"

    kvm_drv = RecordingDriver("kvm-arm-smmu-v3", compatible="arm,smmu-v3")
    created: list[AuxiliaryDevice] = []

    def spawn(pdev: PlatformDevice) -> None:
        auxdev = AuxiliaryDevice("smmu", 0, parent=pdev)
        assert auxiliary_device_init(auxdev) == 0
        assert auxiliary_device_add(k, auxdev, "arm_smmu_v3_kvm") == 0
        created.append(auxdev)

    kvm_drv.before_probe = spawn
    platform_driver_register(k, kvm_drv)
    platform_device_register(k, PlatformDevice(dev_name="2b400000.iommu", fwnode=SMMU))
    (auxdev,) = created
    assert auxdev.name == "arm_smmu_v3_kvm.smmu.0"
    assert bound == [("arm_smmu_v3_kvm.smmu.0", "arm_smmu_v3_kvm.smmu", "2b400000.iommu")]
    assert auxdev.driver is smmu_aux and auxdev.fwnode is None
    assert b.probes("arm_smmu_v3_kvm.smmu.0")[0]["result"] == "bound"


def test_aux_matching_uses_the_name_up_to_the_last_dot() -> None:
    b = booted_kernel()
    k = b.kernel
    parent = PlatformDevice("parent")
    platform_device_register(k, parent)
    seen: list[str] = []
    drv = AuxiliaryDriver(
        "drv",
        lambda auxdev, entry: seen.append(auxdev.name) or 0,
        [AuxiliaryDeviceId("mod.dev"), "mod.dev.extra"],
    )
    auxiliary_driver_register(k, drv, "consumer")
    for name, id_ in (("dev", 1), ("devx", 2), ("dev.extra", 3)):
        auxdev = AuxiliaryDevice(name, id_, parent)
        auxiliary_device_init(auxdev)
        auxiliary_device_add(k, auxdev, "mod")
    assert seen == ["mod.dev.1", "mod.dev.extra.3"]


def test_aux_device_and_driver_validation() -> None:
    b = booted_kernel()
    k = b.kernel
    orphan = AuxiliaryDevice("smmu", 0, parent=None)
    assert auxiliary_device_init(orphan) == -errno.EINVAL
    assert auxiliary_device_add(k, orphan, "mod") == -errno.EINVAL  # never initialised
    assert auxiliary_driver_register(k, AuxiliaryDriver("d", None, ["m.d"]), "m") == -errno.EINVAL
    assert auxiliary_driver_register(k, AuxiliaryDriver("d", lambda a, e: 0, []), "m") == -errno.EINVAL
    parent = PlatformDevice("parent")
    platform_device_register(k, parent)
    twin_a, twin_b = AuxiliaryDevice("smmu", 0, parent), AuxiliaryDevice("smmu", 0, parent)
    for twin in (twin_a, twin_b):
        auxiliary_device_init(twin)
    assert auxiliary_device_add(k, twin_a, "mod") == 0
    assert auxiliary_device_add(k, twin_b, "mod") == -errno.EEXIST


def test_faux_device_is_bound_before_create_returns() -> None:
    b = booted_kernel()
    k = b.kernel
    probed: list[tuple[str, bool]] = []

    def probe(fdev: FauxDevice) -> int:
        probed.append((fdev.name, fdev.registered))
        return 0

    fdev = faux_device_create(k, "pkvm-smmu-0", probe=probe)
    assert fdev is not None
    assert probed == [("pkvm-smmu-0", True)]
    assert fdev.driver is k.faux_driver and fdev.bound
    assert fdev.parent is k.faux_bus_root and fdev.fwnode is None
    assert k.faux_driver.suppress_bind_attrs
    removed: list[str] = []
    fdev.faux_remove = lambda dev: removed.append(dev.name)
    faux_device_destroy(k, fdev)
    assert removed == ["pkvm-smmu-0"] and fdev not in k.faux_bus.devices


def test_faux_probe_failure_or_deferral_means_no_device() -> None:
    b = booted_kernel()
    k = b.kernel
    parent = PlatformDevice("parent")
    platform_device_register(k, parent)
    assert faux_device_create(k, "broken", parent, probe=lambda fdev: -errno.EIO) is None
    assert faux_device_create(k, "deferring", parent, probe=lambda fdev: -EPROBE_DEFER) is None
    assert k.faux_bus.devices == [] and parent.children == []
    assert k.deferred_devices == []  # a faux device is torn down, not left to retry
    assert [e.fields["device"] for e in b.events("faux.create_failed")] == ["broken", "deferring"]
