"""Each boot variant's outcome, as the driver core produces it: which device probes when, which
defers, which fail, whether an endpoint probes without IOMMU ops, and whether isolation holds after
every initcall. Also pKVM disabled or failing: the SMMU must still probe natively (and where a
variant cannot, that is asserted too)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pkvm_smmu.arch.registers import CMDQ_BASE, STRTAB_BASE, Reg
from pkvm_smmu.host.driver_core import InitcallLevel
from pkvm_smmu.host.kvm import BOOT_VARIANTS
from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.pkvm import PkvmSystem, assemble_pkvm, run_pkvm
from pkvm_smmu.scenarios.pkvm_report import PkvmRunReport
from pkvm_smmu.scenarios.report import ProbeStep

SMMU = "9050000.iommu"
ENDPOINTS = ("a000000.dma", "0000:00:01.0", "0000:00:02.0", "0000:00:03.0")


def run(variant: str, **options: object) -> PkvmRunReport:
    return run_pkvm(RunOptions(design="trap-emulate", boot_variant=variant, seed=2, **options))  # type: ignore[arg-type]


def steps(report: PkvmRunReport, device: str) -> list[ProbeStep]:
    return [p for p in report.probes if p.device == device]


def bound(report: PkvmRunReport, device: str) -> ProbeStep:
    return next(p for p in steps(report, device) if p.result == "bound")


def assert_isolation_held(report: PkvmRunReport) -> None:
    assert report.isolation and all(c.protected and c.ok for c in report.isolation), report.isolation


def assert_endpoints_translated(report: PkvmRunReport) -> None:
    devices = {d.name: d for d in report.devices}
    for name in ENDPOINTS:
        assert devices[name].domain_type == "dma", devices[name]
    assert not report.without_iommu_ops
    assert len(report.copies) == 8 and all(c.ok for c in report.copies)


def test_the_variants_are_named() -> None:
    assert list(BOOT_VARIANTS) == ["late-register", "defer", "aux-device", "child-platform", "naive"]


def test_late_register() -> None:
    report = run("late-register")
    assert report.ok, report.problems
    smmu = bound(report, SMMU)
    assert (smmu.initcall, smmu.driver, smmu.attempt) == (
        "device_initcall_sync arm_smmu_driver_init",
        "arm-smmu-v3",
        1,
    )
    # Consumers wait for the SMMU through fw_devlink, then probe behind it once deferred probing runs.
    for name in ("a000000.dma", "3f000000.pcie"):
        first = steps(report, name)[0]
        assert (first.result, first.stage) == ("defer", "links")
    assert all(bound(report, n).initcall == "late_initcall deferred_probe_initcall" for n in ENDPOINTS)
    assert_endpoints_translated(report)
    assert_isolation_held(report)
    afters = [c.after for c in report.isolation]
    assert afters.index("device_initcall_sync finalize_pkvm") < afters.index(
        "device_initcall_sync arm_smmu_driver_init"
    )


def test_defer() -> None:
    report = run("defer")
    assert report.ok, report.problems
    first, second = steps(report, SMMU)
    assert (first.initcall, first.result, first.stage) == (
        "device_initcall arm_smmu_driver_init",
        "defer",
        "probe",
    )
    assert first.reason == "arm-smmu-v3: protected KVM not initialised"
    assert (second.result, second.initcall) == ("bound", "late_initcall deferred_probe_initcall")
    assert_endpoints_translated(report)
    assert_isolation_held(report)


def test_aux_device() -> None:
    report = run("aux-device")
    assert report.ok, report.problems
    pkvm = bound(report, SMMU)
    assert (pkvm.driver, pkvm.initcall) == (
        "kvm-arm-smmu-v3",
        "arch_initcall_sync of_platform_default_populate_init",
    )
    # fw_devlink sees the SMMU's node bound, so consumers get past their links at once; the fwspec
    # holds them in dma_configure until the IOMMU registers (Jason's point).
    for name in ENDPOINTS:
        first = steps(report, name)[0]
        assert (first.result, first.stage, first.reason) == (
            "defer",
            "dma_configure",
            "dma_configure: -EPROBE_DEFER",
        )
    aux = bound(report, "arm_smmu_v3_kvm.smmu.0")
    assert (aux.driver, aux.initcall) == ("arm_smmu_v3.smmu", "device_initcall_sync finalize_pkvm")
    assert report.spawned == ("arm_smmu_v3_kvm.smmu.0 (aux-device of 9050000.iommu)",)
    assert_endpoints_translated(report)
    assert_isolation_held(report)


def test_aux_device_needs_a_lookup_that_finds_the_bound_device() -> None:
    """With Linux's arm_smmu_get_by_fwnode (the first *platform* device with the fwnode) the aux
    variant fails like child-platform: that device is pKVM's."""
    system = assemble_pkvm(RunOptions(design="trap-emulate", boot_variant="aux-device"))
    system.host.smmu_driver.find_by_driver = False
    system.boot()
    failures = system.pkvm_collector.probe_refusals()
    assert failures and all("bus_find_device_by_fwnode" in f and "kvm-arm-smmu-v3" in f for f in failures)
    assert all(not system.host.device(name).bound for name in ENDPOINTS)  # type: ignore[union-attr]


def test_child_platform_fails_as_reported() -> None:
    report = run("child-platform")
    assert not report.ok
    assert bound(report, SMMU).driver == "kvm-arm-smmu-v3"
    child = bound(report, "arm-smmu-v3-kvm.0.auto")
    assert (child.driver, child.initcall) == ("arm-smmu-v3", "device_initcall_sync finalize_pkvm")
    # The pKVM driver matches its own child too (same compatible) and declines it.
    assert [(s.driver, s.result) for s in steps(report, "arm-smmu-v3-kvm.0.auto")] == [
        ("arm-smmu-v3", "bound"), ("kvm-arm-smmu-v3", "rejected")
    ]  # fmt: skip
    # Consumers released early: the first device with the fwnode (pKVM's) is bound.
    for name in ENDPOINTS:
        first, last = steps(report, name)[0], steps(report, name)[-1]
        assert (first.result, first.stage) == ("defer", "dma_configure")
        assert (last.result, last.stage, last.reason) == (
            "rejected",
            "dma_configure",
            "dma_configure: -ENODEV",
        )
    # ... and arm_smmu_probe_device's lookup finds the wrong device.
    assert len(report.iommu_probe_failures) == len(ENDPOINTS)
    for failure in report.iommu_probe_failures:
        assert (
            "bus_find_device_by_fwnode(/iommu@9050000) found 9050000.iommu (bound to kvm-arm-smmu-v3"
            in failure
        )
        assert "2 devices have the fwnode" in failure and "later probe succeeded" not in failure
    assert not report.copies
    assert any("probe failed in dma_configure" in p for p in report.problems)
    assert_isolation_held(report)  # nothing probed, nothing reached


def test_child_platform_with_mainline_of_dma_configure_probes_endpoints_without_iommu_ops() -> None:
    """Mainline carries on without the IOMMU when probe_device fails: the endpoints bind with
    dma-direct, what the seed thread first observed; the hyp's abort STEs still stop their DMA."""
    system = assemble_pkvm(RunOptions(design="trap-emulate", boot_variant="child-platform"))
    system.host.iommu.policy = replace(system.host.iommu.policy, strict_probe=False)
    system.boot()
    collector = system.pkvm_collector
    assert set(collector.without_iommu_ops) == set(ENDPOINTS)
    engine = system.host.dma_engines["a000000.dma"]
    assert system.host.domain_of(engine.dev) is None
    result = engine.copy(4096)
    assert not result.ok and result.state == "error"
    assert all(c.ok for c in system.oracle.checks)


def test_child_platform_with_driver_find_device_by_fwnode_works() -> None:
    system = assemble_pkvm(RunOptions(design="trap-emulate", boot_variant="child-platform"))
    system.host.smmu_driver.find_by_driver = True  # "driver_find_device_by_fwnode() seems to work"
    system.boot()
    for name in ENDPOINTS:
        dev = system.host.device(name)
        assert dev is not None and dev.bound and system.host.domain_of(dev) is not None
    # "... makes me question the reliability": while the SMMU registers it is not yet bound, so the
    # probe that iommu_device_register runs for waiting devices finds nothing; only the retry works.
    failures = system.pkvm_collector.probe_refusals()
    assert len(failures) == len(ENDPOINTS)
    for failure in failures:
        assert "driver_find_device_by_fwnode" in failure and "found None" in failure
        assert failure.endswith("a later probe succeeded")


def naive_until_kvm_arm_init(policy: str = "v4") -> PkvmSystem:
    system = assemble_pkvm(RunOptions(design="trap-emulate", boot_variant="naive", policy=policy))
    system.host.kernel.run_initcalls(until=InitcallLevel.DEVICE)
    return system


def test_naive_the_host_enables_the_smmu_before_pkvm_and_the_take_over_fails() -> None:
    system = naive_until_kvm_arm_init()
    checks = {c.after: c for c in system.oracle.checks}
    before = checks["device_initcall arm_smmu_driver_init"]
    assert before.protected and before.violations == (
        "iommu@9050000: programmed by the host before the hyp took it over (CR0=0x1d)",
    )
    assert all(
        c.ok for c in system.oracle.checks[: list(checks).index("device_initcall arm_smmu_driver_init")]
    )
    # The hyp takes over live state: its CMDQ_BASE and STRTAB_BASE writes are ignored while the
    # host's queue and table are enabled, its commands never complete, and pKVM gives up.
    assert system.pkvm.state == "failed" and system.pkvm.failure == -110
    assert system.kvm.init_error == -110 and not system.kvm.kvm_protected_mode_initialized
    smmu = next(iter(system.machine.smmus.values()))
    host = system.host.smmus[0]
    assert STRTAB_BASE.ADDR.get_address(smmu.strtab_base) == host.strtab_cfg.strtab_dma
    assert CMDQ_BASE.ADDR.get_address(smmu.regs.read(Reg.CMDQ_BASE)) != system.kvm.smmu.entries[0].cmdq_pa
    assert smmu.smmu_enabled  # the host's configuration is still live
    assert checks["device_initcall kvm_arm_init"].note == "pKVM failed (-110)"


def test_pkvm_disabled_every_variant_probes_natively() -> None:
    for variant in BOOT_VARIANTS:
        report = run(variant, pkvm=False)
        assert report.ok, (variant, report.problems)
        assert bound(report, SMMU).driver == "arm-smmu-v3", variant
        assert report.pkvm is None and not report.traps and not report.donation
        assert all(not c.protected and c.note == "pKVM off" for c in report.isolation)
        assert_endpoints_translated(report)


@pytest.mark.parametrize(("variant", "fail"), [("late-register", "cntfrq"), ("late-register", "smmu-stage2"),
                                               ("aux-device", "cntfrq")])  # fmt: skip
def test_pkvm_failing_the_smmu_still_probes_natively(variant: str, fail: str) -> None:
    report = run(variant, pkvm_fail=fail)
    assert report.ok, report.problems
    assert report.pkvm is not None and report.pkvm.state == "failed"
    assert not report.traps and not report.donation  # the host drives the real SMMU
    assert all(not c.protected for c in report.isolation if "kvm_arm_init" in c.after)
    assert_endpoints_translated(report)


def test_defer_with_pkvm_failing_never_probes_the_smmu() -> None:
    """Mostafa's objection to -EPROBE_DEFER: protected mode stays enabled but never initialises, so
    the SMMU defers for good and its consumers with it."""
    report = run("defer", pkvm_fail="cntfrq")
    assert not report.ok
    assert all(s.result == "defer" for s in steps(report, SMMU))
    assert f"{SMMU}: still deferred (arm-smmu-v3: protected KVM not initialised)" in report.problems
    assert not report.copies


def test_child_platform_with_pkvm_failing_still_breaks_the_lookup() -> None:
    report = run("child-platform", pkvm_fail="cntfrq")
    assert not report.ok and len(report.iommu_probe_failures) == len(ENDPOINTS)
