"""IOMMU registration, of_dma_configure, deferral, the deferred-probe timeout, default domains."""

from __future__ import annotations

import errno

import pytest
from iommu_rig import FakeIommuOps, Node, Rig, StaticDomain, build_rig

from pkvm_smmu.host.driver_core import (
    EPROBE_DEFER,
    PlatformDevice,
    PlatformDriver,
    platform_device_register,
    platform_driver_register,
)
from pkvm_smmu.host.iommu import (
    DmaDirection,
    DmaDirectOps,
    DomainType,
    IommuDmaOps,
    IommuPolicy,
    IommuSpec,
    dma_map_single,
)


def smmu_driver(rig: Rig, ops: FakeIommuOps) -> PlatformDevice:
    """An SMMU platform device whose driver registers ``ops`` from its probe, as arm-smmu-v3 does."""
    pdev = PlatformDevice("smmu", dev_name="smmu0")

    def probe(_: PlatformDevice) -> int:
        return rig.register_iommu(ops)

    assert platform_driver_register(rig.kernel, PlatformDriver("smmu", probe)) == 0
    assert platform_device_register(rig.kernel, pdev) == 0
    return pdev


def test_consumer_defers_until_its_iommu_registers_then_probes_behind_it(rig: Rig) -> None:
    dev = rig.platform_device("dma0", sids=[0x100])
    drv = rig.driver()
    rig.late_boot()
    assert dev.driver is None and dev in rig.kernel.deferred_probe_pending_list
    defers = [e.fields["dev"] for e in rig.events("defer")]
    assert set(defers) == {"dma0"} and len(defers) >= 2  # the first try and late_initcall's retries
    assert dev.iommu_fwspec is None  # a failed attempt leaves no fwspec behind

    ops = rig.ops()
    smmu_driver(rig, ops)

    assert drv.bound == ["dma0"]
    assert ops.probed == ["dma0"] and dev.iommu_fwspec.ids == [0x100]
    group = dev.iommu_group
    assert group is not None and group.default_domain is group.domain
    assert group.domain.type is DomainType.DMA and ops.log == [("dma0", f"paging:{id(group.domain):x}")]
    assert isinstance(dev.dma_ops, IommuDmaOps)
    kinds = [e.kind for e in rig.sink.events if e.component == "host.iommu"]
    assert kinds.index("iommu.register") < kinds.index("probe") and kinds.count("defer") == len(defers)


def test_registration_probes_unbound_devices_at_once_and_refuses_a_second_registration(rig: Rig) -> None:
    dev = rig.platform_device("dma0", sids=[0x100, 0x101])
    other = rig.platform_device("plain")  # firmware names no IOMMU for it
    ops = rig.ops()
    assert rig.register_iommu(ops) == 0
    assert dev.iommu_group is not None and dev.iommu_fwspec.ids == [0x100, 0x101]
    assert other.iommu_group is None and ops.probed == ["dma0"]
    assert rig.register_iommu(ops) == -errno.EEXIST
    assert rig.core.iommu_ops_from_fwnode(rig.iommu_node) is ops


def test_device_without_an_iommu_gets_dma_direct(rig: Rig) -> None:
    dev = rig.platform_device("plain")
    rig.driver()
    assert dev.bound and dev.iommu_group is None
    assert isinstance(dev.dma_ops, DmaDirectOps)
    assert dma_map_single(dev, 0x4000_1234, 64, DmaDirection.TO_DEVICE) == 0x4000_1234


def test_deferred_probe_timeout_lets_the_device_probe_without_its_iommu() -> None:
    rig = build_rig(deferred_probe_timeout_s=10)
    dev = rig.platform_device("dma0", sids=[0x100])
    rig.driver()
    rig.late_boot()
    assert dev.driver is None
    rig.advance_us(10_000_000)
    rig.kernel.run_timers()  # the deferred-probe timeout work fires and retries everything

    assert dev.bound and dev.iommu_group is None and isinstance(dev.dma_ops, DmaDirectOps)
    warnings = [e.fields["message"] for e in rig.events("warn") if e.fields.get("dev") == "dma0"]
    assert warnings == ["deferred probe timeout, ignoring IOMMU dependency"]
    # The IOMMU arriving later does not take a device that is already bound.
    ops = rig.ops()
    assert rig.register_iommu(ops) == 0
    assert dev.iommu_group is None and ops.probed == []
    assert dma_map_single(dev, 0x4000_0000, 4096, DmaDirection.FROM_DEVICE) == 0x4000_0000


def test_without_modules_the_dependency_is_dropped_once_initcalls_are_done() -> None:
    rig = build_rig(modules=False)
    dev = rig.platform_device("dma0", sids=[0x100])
    rig.driver()
    assert dev.driver is None  # before late_initcall: still waiting
    rig.late_boot()
    assert dev.bound and dev.iommu_group is None and isinstance(dev.dma_ops, DmaDirectOps)


def test_probe_device_error_fails_the_probe_under_strict_probe(rig: Rig) -> None:
    ops = rig.ops()
    ops.probe_errors["dma0"] = -errno.ENOSPC
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[0x100])
    drv = rig.driver()
    assert drv.bound == [] and dev.iommu_group is None and dev.iommu is None
    assert rig.events("probe")[-1].fields["result"] == -errno.ENOSPC


def test_probe_device_error_without_strict_probe_carries_on_without_the_iommu() -> None:
    rig = build_rig(IommuPolicy(strict_probe=False))
    ops = rig.ops()
    ops.probe_errors["dma0"] = -errno.ENOSPC
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[0x100])
    drv = rig.driver()
    assert drv.bound == ["dma0"] and dev.iommu_group is None and isinstance(dev.dma_ops, DmaDirectOps)
    assert any(e.fields["message"] == "adding to IOMMU failed" for e in rig.events("warn"))


def test_disabled_iommu_node_means_no_iommu(rig: Rig) -> None:
    rig.firmware.specs[Node("/dma0")] = [IommuSpec(rig.iommu_node, (1,), available=False)]
    rig.register_iommu(rig.ops())
    dev = rig.platform_device("dma0")
    rig.driver()
    assert dev.bound and dev.iommu_group is None


# -- default domain policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ("", DomainType.DMA),
        ("iommu.strict=1", DomainType.DMA),
        ("iommu.strict=0", DomainType.DMA_FQ),
        ("iommu.passthrough=1", DomainType.IDENTITY),
        ("iommu.passthrough=on iommu.strict=0", DomainType.IDENTITY),
        ("quiet iommu.passthrough=0 iommu.strict=n", DomainType.DMA_FQ),
    ],
)
def test_policy_from_cmdline(cmdline: str, expected: DomainType) -> None:
    rig = build_rig(IommuPolicy.from_cmdline(cmdline))
    rig.register_iommu(rig.ops())
    dev = rig.platform_device("dma0", sids=[1])
    assert dev.iommu_group.default_domain.type is expected


def test_policy_rejects_a_bad_value_naming_the_option() -> None:
    with pytest.raises(ValueError, match=r"iommu\.strict=maybe"):
        IommuPolicy.from_cmdline("iommu.strict=maybe")


def test_passthrough_default_is_the_drivers_identity_domain_and_dma_is_direct() -> None:
    rig = build_rig(IommuPolicy.from_cmdline("iommu.passthrough=1"))
    ops = rig.ops()
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[1])
    assert dev.iommu_group.domain is ops.identity_domain and ops.domains == []
    assert dma_map_single(dev, 0x5000_0000, 4096, DmaDirection.BIDIRECTIONAL) == 0x5000_0000


def test_driver_def_domain_type_overrides_policy_both_ways() -> None:
    rig = build_rig(IommuPolicy.from_cmdline("iommu.passthrough=1"))
    ops = rig.ops()
    ops.def_types["gpu"] = DomainType.DMA
    rig.register_iommu(ops)
    gpu = rig.platform_device("gpu", sids=[1])
    other = rig.platform_device("nic", sids=[2])
    assert gpu.iommu_group.default_domain.type is DomainType.DMA
    assert other.iommu_group.default_domain is ops.identity_domain

    strict = build_rig()
    ops2 = strict.ops()
    ops2.def_types["isp"] = DomainType.IDENTITY
    strict.register_iommu(ops2)
    isp = strict.platform_device("isp", sids=[3])
    assert isp.iommu_group.default_domain is ops2.identity_domain


def test_lazy_policy_falls_back_to_strict_without_deferred_flush() -> None:
    rig = build_rig(IommuPolicy.from_cmdline("iommu.strict=0"))
    rig.register_iommu(rig.ops(deferred_flush=False))
    dev = rig.platform_device("dma0", sids=[1])
    domain = dev.iommu_group.default_domain
    assert domain.type is DomainType.DMA and domain.iova_cookie.fq is None


def test_identity_only_driver_gets_identity_default_domains(rig: Rig) -> None:
    ops = rig.ops(paging=False)
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[1])
    rig.driver()
    assert dev.bound and dev.iommu_group.domain is ops.identity_domain
    assert ops.log == [("dma0", "identity")]
    assert any("using identity" in e.fields["message"] for e in rig.events("warn"))
    assert rig.core.iommu_paging_domain_alloc(dev) == -errno.EOPNOTSUPP
    assert dma_map_single(dev, 0x4800_0000, 100, DmaDirection.TO_DEVICE) == 0x4800_0000


def test_static_default_domain_is_used_as_is(rig: Rig) -> None:
    ops = rig.ops()
    ops.default_domain = ops.identity_domain  # type: ignore[attr-defined]
    ops.def_types["dma0"] = DomainType.DMA  # ignored: the static default domain decides
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[1])
    assert dev.iommu_group.default_domain is ops.identity_domain and ops.domains == []


def test_driver_without_paging_or_identity_cannot_probe(rig: Rig) -> None:
    ops = rig.ops(paging=False, identity=False)
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[1])
    drv = rig.driver()
    assert drv.bound == [] and dev.iommu_group is None and set(ops.released) == {"dma0"}


def test_attach_failure_of_the_default_domain_fails_the_probe_and_frees_it(rig: Rig) -> None:
    ops = rig.ops()
    original = ops.domain_alloc_paging

    def failing(dev: object) -> object:
        domain = original(dev)
        domain.fail_attach.add("dma0")  # type: ignore[union-attr]
        return domain

    ops.domain_alloc_paging = failing  # type: ignore[method-assign]
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[1])
    assert dev.iommu_group is None and ops.domains[0].freed and rig.core.groups == []


def test_pci_aliases_share_a_group_and_separate_functions_do_not(rig: Rig) -> None:
    rig.register_iommu(rig.ops())
    fn0 = rig.pci_device(0x10, sid=0x10)
    fn1 = rig.pci_device(0x11, sid=0x11, aliases=(0x10,))
    lone = rig.pci_device(0x18, sid=0x18)
    assert fn0.iommu_group is fn1.iommu_group and fn0.iommu_group.devices == [fn0, fn1]
    assert lone.iommu_group is not fn0.iommu_group
    assert fn1.iommu_group.domain is fn0.iommu_group.default_domain


def test_unregistering_the_iommu_releases_its_devices(rig: Rig) -> None:
    ops = rig.ops()
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[1])
    domain = dev.iommu_group.default_domain
    assert rig.core.iommu_device_unregister(ops) == 0
    assert dev.iommu_group is None and dev.iommu_fwspec is None and ops.released == ["dma0"]
    assert domain.freed and rig.core.iommus == []


def test_device_removal_releases_it_from_the_iommu(rig: Rig) -> None:
    ops = rig.ops()
    rig.register_iommu(ops)
    dev = rig.platform_device("dma0", sids=[1])
    rig.kernel.device_del(dev)
    assert ops.released == ["dma0"] and rig.core.groups == []


def test_defer_returns_eprobe_defer_from_the_hook(rig: Rig) -> None:
    dev = PlatformDevice("endpoint", dev_name="x")
    dev.fwnode = Node("/x")
    rig.firmware.specs[dev.fwnode] = [IommuSpec(rig.iommu_node, (5,))]
    assert rig.core.of_dma_configure(dev) == -EPROBE_DEFER
    assert rig.core.of_iommu_configure(dev) == -EPROBE_DEFER


def test_domains_that_are_not_paging_refuse_map_pages_by_default() -> None:
    domain = StaticDomain(DomainType.BLOCKED, [])
    assert domain.map_pages(0, 0, 4096, 1, 0) == (0, -errno.ENODEV)  # type: ignore[arg-type]
    assert domain.type.is_paging is False and DomainType.DMA_FQ.is_paging
