"""``--design pv-identity`` (both boot variants) and ``--design pv-paging``: complete boots of the
same host kernel with the same DMA workload, their probe ordering, devices that start in ABORT,
and what the report says."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from pkvm_smmu.host.hw import is_fault
from pkvm_smmu.scenarios import DESIGNS, design, run
from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.pv import BOOT_VARIANTS, BootVariantError, boot_pv, run_pv_identity, run_pv_paging
from pkvm_smmu.trace import RecordingSink

DMA_DEVICES = {"a000000.dma", "0000:00:01.0", "0000:00:02.0", "0000:00:03.0"}


def steps(report: Any, device: str) -> list[tuple[str, str, str]]:
    return [(p.initcall, p.driver, p.result) for p in report.probes if p.device == device]


def test_designs_are_registered() -> None:
    assert design("pv-identity") is run_pv_identity and design("pv-paging") is run_pv_paging
    assert {"native", "pv-identity", "pv-paging"} <= set(DESIGNS)
    assert BOOT_VARIANTS["pv-identity"] == ("three-drivers", "impl-hooks")


@pytest.mark.parametrize("variant", ["three-drivers", "impl-hooks"])
def test_pv_identity_boots_and_passes_the_workload(variant: str) -> None:
    report = run(RunOptions(design="pv-identity", boot_variant=variant, seed=3))
    assert report.ok, report.problems
    assert report.metadata["boot_variant"] == variant
    assert report.metadata["domain_types"] == ["identity"]
    assert report.metadata["dma_api"].startswith("identity")
    assert {d.name for d in report.devices if d.domain_type == "identity"} == DMA_DEVICES
    assert report.translations.verified == report.translations.transfers == 8
    assert report.translations.iommu_maps == 0  # identity: the DMA API maps nothing
    assert all(check.skipped for check in report.fault_checks)  # nothing translates, nothing faults


def test_pv_paging_boots_and_passes_the_workload() -> None:
    report = run(RunOptions(design="pv-paging", seed=3))
    assert report.ok, report.problems
    assert report.metadata["domain_types"] == ["dma"]
    assert report.metadata["dma_api"].startswith("paging")
    assert report.translations.verified == 8 and report.translations.iommu_maps >= 16
    # The deliberate fault was recorded by the SMMU and drained by the hyp, for the right device.
    (check,) = [c for c in report.fault_checks if not c.skipped]
    assert check.observed
    assert any(f.address == check.iova and f.client == check.device for f in report.faults)


def test_three_drivers_probe_ordering() -> None:
    report = run(RunOptions(design="pv-identity", boot_variant="three-drivers"))
    smmu = steps(report, "9050000.iommu")
    assert smmu == [("arch_initcall_sync of_platform_default_populate_init", "arm-smmu-v3-pkvm", "bound")]
    assert steps(report, "pkvm_smmu.viommu.0") == [
        ("device_initcall_sync kvm_arm_smmu_v3_spawn", "pkvm_pviommu", "bound")
    ]
    for dev in DMA_DEVICES:
        first, *rest = [p for p in report.probes if p.device == dev]
        # Consumers were never held by fw_devlink (their supplier is bound) but by the IOMMU core.
        assert first.result == "defer" and first.stage == "dma_configure"
        assert rest[-1].result == "bound"


def test_impl_hooks_probe_ordering() -> None:
    report = run(RunOptions(design="pv-identity", boot_variant="impl-hooks"))
    smmu = [p for p in report.probes if p.device == "9050000.iommu"]
    assert (smmu[0].driver, smmu[0].result) == ("arm-smmu-v3", "defer")
    assert "pKVM is not initialised" in (smmu[0].reason or "")
    assert smmu[-1].result == "bound" and smmu[-1].initcall.startswith("late_initcall")
    platform = [p for p in report.probes if p.device == "a000000.dma"]
    assert platform[0].stage == "links"  # fw_devlink: the SMMU is not bound yet


@pytest.mark.parametrize("variant", ["three-drivers", "impl-hooks"])
def test_devices_start_in_abort_then_switch_to_identity(variant: str) -> None:
    sink = RecordingSink()
    system = boot_pv(RunOptions(design="pv-identity", boot_variant=variant), sinks=[sink])
    names = [(e.component, e.kind) for e in sink.events]
    finalised = names.index(("host.kernel", "finalize_pkvm"))
    installs = [(i, e.fields) for i, e in enumerate(sink.events) if e.kind == "ste.install"]
    assert installs and all(i > finalised for i, _ in installs)  # nothing before pKVM owns the SMMU
    by_sid: dict[int, list[tuple[str, str, str]]] = {}
    for _, f in installs:
        by_sid.setdefault(f["sid"], []).append((f["why"], f["old"], f["new"]))
    assert set(by_sid) == {8, 16, 24, 256}
    for history in by_sid.values():
        assert history[0] == ("attach_blocking", "abort", "abort")  # probe_device: blocked
        assert history[-1] == ("attach_identity", "abort", "s2")  # the default domain
    # The host cannot touch the SMMU's registers.
    smmu = next(iter(system.machine.smmus.values()))
    assert is_fault(system.host.cpu.read(smmu.base, 4))
    assert is_fault(system.host.cpu.write(smmu.base + 0x20, 4, 0))


def test_faux_devices_work_as_well_as_auxiliary_ones() -> None:
    system = boot_pv(RunOptions(design="pv-paging"), spawn="faux")
    bound = {d.name for d in system.host.devices() if d.domain_type == "dma"}
    assert bound == DMA_DEVICES
    engine = next(iter(system.host.dma_engines.values()))
    assert engine.copy(8192, seed=1).ok


def test_pv_paging_refcounts_dma_buffers_during_a_copy() -> None:
    system = boot_pv(RunOptions(design="pv-paging"))
    mp = system.pkvm.mem_protect
    engine = next(iter(system.host.dma_engines.values()))
    assert not mp._dma_refs  # the boot left nothing mapped
    assert engine.copy(3 * 4096, seed=2).ok
    assert not mp._dma_refs  # dma_unmap dropped every reference
    # A host that donates a page while a device may reach it is refused.
    host = system.host
    pa = host.mm.alloc_pages(1)
    assert pa is not None
    from pkvm_smmu.host.iommu import DmaDirection, dma_map_single, dma_unmap_single

    dma = dma_map_single(engine.dev, pa, 4096, DmaDirection.BIDIRECTIONAL)
    assert mp.dma_refcount(pa >> 12) == 1
    assert system.pkvm.hvc("__pkvm_host_share_hyp", pa >> 12) == -errno.EBUSY
    dma_unmap_single(engine.dev, dma, 4096, DmaDirection.BIDIRECTIONAL)
    assert system.pkvm.hvc("__pkvm_host_share_hyp", pa >> 12) == 0


def test_runs_are_deterministic() -> None:
    a = run(RunOptions(design="pv-paging", seed=5))
    b = run(RunOptions(design="pv-paging", seed=5))
    assert a == b


def test_unknown_boot_variant_is_refused() -> None:
    with pytest.raises(BootVariantError, match="--boot-variant impl-hooks"):
        run(RunOptions(design="pv-paging", boot_variant="impl-hooks"))
    with pytest.raises(BootVariantError):
        run(RunOptions(design="pv-identity", boot_variant="defer"))


def test_cli_runs_the_pv_designs_and_names_a_bad_variant() -> None:
    from click.testing import CliRunner

    from pkvm_smmu.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["run", "--design", "pv-identity", "--boot-variant", "impl-hooks"])
    assert result.exit_code == 0, result.output
    assert "boot-variant=impl-hooks" in result.output and "DMA API: identity" in result.output
    result = runner.invoke(main, ["run", "--design", "pv-paging", "--boot-variant", "impl-hooks"])
    assert result.exit_code == 2 and "--boot-variant" in result.output
