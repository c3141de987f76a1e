"""Device links and fw_devlink: a consumer probes only once its suppliers are bound, whichever was
registered first; supplier unbind takes consumers down first; link flags behave as Linux's."""

from __future__ import annotations

from driver_core_helpers import Node, RecordingDriver, booted_kernel, make_kernel

from pkvm_smmu.host.driver_core import (
    DL_FLAG_AUTOPROBE_CONSUMER,
    DL_FLAG_AUTOREMOVE_CONSUMER,
    DL_FLAG_STATELESS,
    DL_STATE_ACTIVE,
    DL_STATE_AVAILABLE,
    DL_STATE_DORMANT,
    DL_STATE_NONE,
    PlatformDevice,
    platform_device_register,
    platform_driver_register,
)

SMMU = Node("/smmu@2b400000", ("arm,smmu-v3",))
NIC = Node("/ethernet@1c000000", ("vendor,nic",))


def _pair() -> tuple[PlatformDevice, PlatformDevice]:
    return (
        PlatformDevice(dev_name="nic", fwnode=NIC),
        PlatformDevice(dev_name="smmu", fwnode=SMMU),
    )


def test_consumer_listed_first_probes_only_after_its_supplier_binds() -> None:
    b = make_kernel(fw_devlink="off")
    k = b.kernel
    nic, smmu = _pair()
    platform_device_register(k, nic)
    platform_device_register(k, smmu)
    link = k.device_link_add(nic, smmu, DL_FLAG_AUTOPROBE_CONSUMER)
    assert link is not None and link.status is DL_STATE_DORMANT

    order: list[str] = []
    nic_drv = RecordingDriver("nic", compatible="vendor,nic")
    smmu_drv = RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3")
    nic_drv.before_probe = smmu_drv.before_probe = lambda pdev: order.append(pdev.name)
    k.module_init(lambda: platform_driver_register(k, nic_drv))  # the consumer's driver comes first
    k.module_init(lambda: platform_driver_register(k, smmu_drv))

    k.run_initcalls(until="device_sync")
    assert order == ["smmu"]  # the consumer never reached its probe ...
    assert nic.driver is None
    assert b.probes("nic")[0]["stage"] == "links"
    assert b.probes("nic")[0]["reason"] == "supplier smmu not ready"
    assert link.status is DL_STATE_AVAILABLE

    k.run_initcalls()  # ... and is retried once deferred probing starts
    assert order == ["smmu", "nic"]
    assert nic.driver is nic_drv and link.status is DL_STATE_ACTIVE


def test_autoprobe_consumer_is_retried_as_soon_as_the_supplier_binds_once_booted() -> None:
    b = booted_kernel()
    k = b.kernel
    nic, smmu = _pair()
    platform_device_register(k, nic)
    platform_device_register(k, smmu)
    k.device_link_add(nic, smmu, DL_FLAG_AUTOPROBE_CONSUMER)
    nic_drv = RecordingDriver("nic", compatible="vendor,nic")
    platform_driver_register(k, nic_drv)
    assert nic.driver is None and nic_drv.probed == []
    platform_driver_register(k, RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3"))
    assert nic.driver is nic_drv


def test_stateless_link_never_blocks_probe() -> None:
    b = booted_kernel()
    k = b.kernel
    nic, smmu = _pair()
    platform_device_register(k, nic)
    platform_device_register(k, smmu)
    link = k.device_link_add(nic, smmu, DL_FLAG_STATELESS)
    assert link is not None and link.status is DL_STATE_NONE
    platform_driver_register(k, RecordingDriver("nic", compatible="vendor,nic"))
    assert nic.driver is not None
    k.device_link_del(link)
    assert nic.links.suppliers == [] and smmu.links.consumers == []


def test_supplier_unbind_unbinds_active_consumers_first_and_blocks_their_reprobe() -> None:
    b = booted_kernel()
    k = b.kernel
    nic, smmu = _pair()
    platform_device_register(k, nic)
    platform_device_register(k, smmu)
    link = k.device_link_add(nic, smmu, DL_FLAG_AUTOPROBE_CONSUMER)
    assert link is not None
    smmu_drv = RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3")
    nic_drv = RecordingDriver("nic", compatible="vendor,nic")
    platform_driver_register(k, smmu_drv)
    platform_driver_register(k, nic_drv)
    assert nic.driver is nic_drv

    k.device_release_driver(smmu)
    assert [e.fields["device"] for e in b.events("unbind")] == ["nic", "smmu"]
    assert link.status is DL_STATE_DORMANT
    assert k.device_attach(nic) == 0 and nic.driver is None  # the supplier is gone

    k.device_attach(smmu)
    assert smmu.driver is smmu_drv and nic.driver is nic_drv  # AUTOPROBE brings it back


def test_autoremove_consumer_link_goes_when_the_consumer_unbinds() -> None:
    b = booted_kernel()
    k = b.kernel
    nic, smmu = _pair()
    platform_device_register(k, nic)
    platform_device_register(k, smmu)
    platform_driver_register(k, RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3"))
    platform_driver_register(k, RecordingDriver("nic", compatible="vendor,nic"))
    link = k.device_link_add(nic, smmu, DL_FLAG_AUTOREMOVE_CONSUMER)
    assert link is not None and link.status is DL_STATE_ACTIVE  # both ends already bound
    k.device_release_driver(nic)
    assert nic.links.suppliers == [] and smmu.links.consumers == []


def test_device_link_add_refuses_loops_bad_flags_and_unregistered_suppliers() -> None:
    b = booted_kernel()
    k = b.kernel
    nic, smmu = _pair()
    platform_device_register(k, nic)
    assert k.device_link_add(nic, smmu, 0) is None  # supplier not registered yet
    platform_device_register(k, smmu)
    assert k.device_link_add(nic, smmu, DL_FLAG_STATELESS | DL_FLAG_AUTOPROBE_CONSUMER) is None
    assert k.device_link_add(nic, smmu, DL_FLAG_AUTOPROBE_CONSUMER | DL_FLAG_AUTOREMOVE_CONSUMER) is None
    assert k.device_link_add(nic, nic, 0) is None
    first = k.device_link_add(nic, smmu, 0)
    assert first is not None
    assert k.device_link_add(smmu, nic, 0) is None  # would close a loop
    assert k.device_link_add(nic, smmu, DL_FLAG_AUTOPROBE_CONSUMER) is first  # the pair has one link
    assert [e.fields["why"] for e in b.events("link.refused")] == [
        "supplier not registered",
        "flags",
        "flags",
        "flags",
        "dependency loop",
    ]


def test_fw_devlink_holds_a_consumer_until_the_supplier_device_exists_and_binds() -> None:
    b = booted_kernel()
    k = b.kernel
    k.fwnode_link_add(NIC, SMMU)  # firmware: the NIC's iommus = <&smmu>
    nic_drv = RecordingDriver("nic", compatible="vendor,nic")
    smmu_drv = RecordingDriver("arm-smmu-v3", compatible="arm,smmu-v3")
    platform_driver_register(k, nic_drv)
    platform_driver_register(k, smmu_drv)

    nic = PlatformDevice(dev_name="nic", fwnode=NIC)
    platform_device_register(k, nic)  # the consumer first: its supplier is not even a device yet
    assert nic.driver is None and nic_drv.probed == []
    assert b.probes("nic")[0]["reason"] == "wait for supplier /smmu@2b400000"

    smmu = PlatformDevice(dev_name="smmu", fwnode=SMMU)
    platform_device_register(k, smmu)
    assert smmu.driver is smmu_drv and nic.driver is nic_drv
    assert k.fwnode_links == []  # became a device link
    (link,) = nic.links.suppliers
    assert link.supplier is smmu and link.status is DL_STATE_ACTIVE
    assert [(e.fields["consumer"], e.fields["supplier"]) for e in b.events("link.add")] == [("nic", "smmu")]


def test_fw_devlink_add_links_hook_is_asked_once_per_node() -> None:
    b = booted_kernel()
    k = b.kernel
    asked: list[str] = []

    def add_links(fwnode: object) -> None:
        asked.append(str(getattr(fwnode, "full_name", fwnode)))
        if fwnode == NIC:
            k.fwnode_link_add(NIC, SMMU)

    k.fwnode_add_links = add_links
    nic = PlatformDevice(dev_name="nic", fwnode=NIC)
    platform_driver_register(k, RecordingDriver("nic", compatible="vendor,nic"))
    platform_device_register(k, nic)
    platform_device_register(k, PlatformDevice(dev_name="smmu", fwnode=SMMU))
    assert asked == ["/ethernet@1c000000", "/smmu@2b400000"]
    assert nic.driver is None  # supplier registered, but no driver bound it
    assert [link.supplier.name for link in nic.links.suppliers] == ["smmu"]


def test_fw_devlink_does_not_wait_for_a_node_initialised_without_a_device() -> None:
    b = booted_kernel()
    k = b.kernel
    gic = Node("/interrupt-controller@2f000000", ("arm,gic-v3",))
    k.fwnode_dev_initialized(gic)  # IRQCHIP_DECLARE: set up early, never a platform device
    k.fwnode_link_add(NIC, gic)
    nic_drv = RecordingDriver("nic", compatible="vendor,nic")
    platform_driver_register(k, nic_drv)
    nic = PlatformDevice(dev_name="nic", fwnode=NIC)
    platform_device_register(k, nic)
    assert nic.driver is nic_drv and k.fwnode_links == []


def test_fw_devlink_permissive_never_blocks() -> None:
    b = make_kernel(fw_devlink="permissive")
    k = b.kernel
    k.run_initcalls()
    k.fwnode_link_add(NIC, SMMU)
    platform_driver_register(k, RecordingDriver("nic", compatible="vendor,nic"))
    nic = PlatformDevice(dev_name="nic", fwnode=NIC)
    platform_device_register(k, nic)
    assert nic.driver is not None
