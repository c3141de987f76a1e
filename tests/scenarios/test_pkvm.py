"""The trap-emulate design end to end: the unmodified host driver runs the native DMA workload under
pKVM through nested translation; pages donated to the hyp or a guest are unreachable by every host
device as soon as the donation returns, cached translations included, and reachable again only once
the identity stage-2 maps them back; the report, derived from the trace, and its metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkvm_smmu.arch.strtab import STE, SteConfig
from pkvm_smmu.host.iommu import DmaDirection, dma_map_single
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.scenarios import DEFAULT_DESIGN, DESIGNS, run
from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.pkvm import GuestDonation, OptionError, PkvmSystem, boot_pkvm, run_pkvm
from pkvm_smmu.scenarios.pkvm_report import PkvmRunReport
from pkvm_smmu.trace import load_jsonl


@pytest.fixture(scope="module")
def report() -> PkvmRunReport:
    return run_pkvm(RunOptions(design="trap-emulate", seed=7))


def shadow_config(system: PkvmSystem, sid: int) -> SteConfig:
    driver = system.hyp.driver
    assert driver is not None
    (smmu,) = driver.smmus
    ptr = smmu._ste_ptr(sid, smmu.strtab_base)
    assert ptr is not None
    data = system.machine.bus.ram.read(ptr, 64)
    return SteConfig(STE.CONFIG.get(STE.from_bytes(data)))


def test_trap_emulate_is_the_default_design() -> None:
    assert DEFAULT_DESIGN == "trap-emulate" and "trap-emulate" in DESIGNS


def test_same_workload_as_natively(report: PkvmRunReport) -> None:
    native = run(RunOptions(design="native", seed=7))
    assert report.ok, report.problems
    assert [(c.device, c.size, c.ok) for c in report.copies] == [
        (c.device, c.size, c.ok) for c in native.copies
    ]
    assert [(f.device, f.observed, f.event) for f in report.fault_checks] == [
        (f.device, f.observed, f.event) for f in native.fault_checks
    ]
    assert [(d.name, d.driver, d.domain_type) for d in report.devices] == [
        (d.name, d.driver, d.domain_type) for d in native.devices
    ]
    # Through the emulation: every host command went through the hyp's filter, STEs were shadowed.
    seen = {row.opcode: row for row in report.filter}
    assert seen["CFGI_STE"].seen > 0 and seen["SYNC"].seen > 0 and seen["TLBI_NH_VA"].seen > 0
    assert dict(report.stes) == {"abort": 4, "nested": 4}


def test_dma_domains_are_nested_and_identity_domains_s2_only() -> None:
    system = boot_pkvm(RunOptions(design="trap-emulate"))
    sids = {name: system.host.stream_ids(name)[0] for name in ("a000000.dma", "0000:00:02.0")}
    assert all(shadow_config(system, sid) == SteConfig.NESTED for sid in sids.values())
    passthrough = boot_pkvm(RunOptions(design="trap-emulate", cmdline="iommu.passthrough=1"))
    assert all(shadow_config(passthrough, sid) == SteConfig.S2_TRANS for sid in sids.values())
    engine = passthrough.host.dma_engines["a000000.dma"]
    assert engine.copy(3 * PAGE_SIZE, seed=1).ok  # identity domain, through the identity stage-2


def test_donated_pages_are_unreachable_including_cached_translations(report: PkvmRunReport) -> None:
    donated = [d for d in report.donation if d.step.startswith("donated")]
    assert {d.owner for d in donated} == {"hyp", "guest4096"}
    assert len({d.device for d in donated}) == 4 and len({d.page for d in donated}) == 3
    for dma in donated:
        assert dma.cached, dma  # the SMMU held the translation when the donation began
        assert not dma.read and not dma.write and dma.ok
    reclaimable = [d for d in report.donation if d.step == "VM torn down, not yet reclaimed"]
    assert reclaimable and all(not d.reachable for d in reclaimable)
    # The hyp invalidated the identity stage-2 for each page before the donation returned.
    rows = {row.transition: row for row in report.ownership}
    assert (
        rows["host_donate_guest"].invalidations == 2
        and rows["host_donate_guest"].idmap_unmapped == 2 * PAGE_SIZE
    )
    assert rows["host_donate_guest"].tlbi_commands >= 2 * 4  # TLBI_S2_IPA + SYNC, TLBI_NH_ALL + SYNC each
    assert rows["host_donate_hyp"].invalidations >= 1


def test_returned_pages_are_reachable_once_mapped_again(report: PkvmRunReport) -> None:
    for step in (
        "relinquished by the guest",
        "VM torn down (state page back to the host)",
        "reclaimed by the host",
    ):
        checks = [d for d in report.donation if d.step == step]
        assert checks and all(d.read and d.write and d.ok for d in checks), step
        assert checks[0].remapped  # the identity stage-2 mapped the page again between the two steps
        assert not any(d.leaked for d in checks)  # poisoned: the guest's data is gone
    rows = {row.transition: row for row in report.ownership}
    for transition in ("guest_relinquish_to_host", "hyp_donate_host", "host_reclaim_page"):
        assert rows[transition].idmap_mapped == PAGE_SIZE, transition


def test_donation_right_after_the_hypercall() -> None:
    """No other step between the donation returning and the device's access."""
    system = boot_pkvm(RunOptions(design="trap-emulate"))
    host, kvm = system.host, system.kvm
    engine = host.dma_engines["0000:00:01.0"]
    page = host.mm.alloc_zeroed_pages(1)
    assert page is not None
    iova = dma_map_single(engine.dev, page, PAGE_SIZE, DmaDirection.BIDIRECTIONAL)
    endpoint = system.machine.dma_device("00:01.0").endpoint
    assert endpoint.write(iova, b"mine").ok and endpoint.read(iova, 4).data == b"mine"
    handle = kvm.pkvm_init_vm()
    assert handle > 0
    assert kvm.pkvm_host_donate_guest(page >> PAGE_SHIFT, 5, handle) == 0
    assert not endpoint.read(iova, 4).ok and not endpoint.write(iova, b"evil").ok
    assert system.machine.bus.ram.read(page, 4) == b"mine"


def test_report_counts_come_from_the_trace(report: PkvmRunReport) -> None:
    assert report.pkvm is not None and report.pkvm.state == "protected"
    assert report.pkvm.carveout_pages > report.pkvm.iommu_pool_pages > 0 < report.pkvm.pool_pages_used
    traps = {(t.reg, t.access): t for t in report.traps}
    assert traps[("CMDQ_PROD", "emulate")].writes > 0 and traps[("IDR0", "read-only")].reads == 1
    assert report.idmap is not None and report.idmap.pages > 0 and report.idmap.entries > (1 << 20)
    assert report.idmap.unmaps == report.idmap.invalidations == 3
    assert [name for name, _, errors in report.hypercalls if errors] == []
    assert all(c.ok and c.protected for c in report.isolation)
    assert report.isolation[-1].after == "guest donation"


def test_metadata_records_design_policy_and_boot_variant(tmp_path: Path) -> None:
    jsonl = tmp_path / "run.jsonl"
    report = run_pkvm(RunOptions(design="trap-emulate", boot_variant="defer", trace_jsonl=str(jsonl)))
    expected = {"design": "trap-emulate", "policy": "v4", "boot_variant": "defer", "pkvm": "protected"}
    assert expected.items() <= report.metadata.items()
    log = load_jsonl(jsonl)
    assert expected.items() <= log.metadata.items()
    assert any(e.component == "isolation" for e in log.events)


def test_the_boot_variant_defaults_to_late_register() -> None:
    report = run_pkvm(RunOptions(design="trap-emulate", boot_variant="none"))
    assert report.metadata["boot_variant"] == "late-register"


@pytest.mark.parametrize(
    ("options", "option"),
    [({"boot_variant": "later"}, "--boot-variant"), ({"policy": "v5"}, "--policy"),
     ({"pkvm_fail": "sometimes"}, "--pkvm-fail")],
)  # fmt: skip
def test_bad_options_name_the_option(options: dict[str, str], option: str) -> None:
    with pytest.raises(OptionError) as error:
        run_pkvm(RunOptions(design="trap-emulate", **options))  # type: ignore[arg-type]
    assert error.value.option == option


def test_deterministic() -> None:
    a = run_pkvm(RunOptions(design="trap-emulate", seed=3))
    b = run_pkvm(RunOptions(design="trap-emulate", seed=3))
    assert a == b


def test_no_donation_without_pkvm() -> None:
    system = boot_pkvm(RunOptions(design="trap-emulate", pkvm=False))
    assert GuestDonation(system).run() == 0 and not system.pkvm_collector.donation
