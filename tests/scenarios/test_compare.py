"""The design comparison: counts derived from the trace, checked against what each design's rules
say one operation must cost; determinism; the cost model and its calibration; the oracle's verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkvm_smmu.platforms import platform_source
from pkvm_smmu.scenarios.compare import (
    ISOLATION_NA,
    OPERATIONS,
    CompareError,
    Comparison,
    OpCounts,
    compare,
    measure,
)
from pkvm_smmu.scenarios.cost_model import (
    CALIBRATION,
    RFC_V2_MORELLO,
    CostModel,
    PricedCounts,
)
from pkvm_smmu.trace import Counters, TraceBus

ITERATIONS = 2
PKVM_DESIGNS = ("pv-identity", "pv-paging", "trap-emulate")
SMMU = "iommu@9050000"  # the default platform's SMMU model


@pytest.fixture(scope="module")
def comparison() -> Comparison:
    return compare(iterations=ITERATIONS, seed=7)


def per_op(comparison: Comparison, design: str, operation: str) -> tuple[int, OpCounts]:
    op = comparison.result(design).operation(operation)
    return op.n, op.total


# -- determinism --------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_comparison(comparison: Comparison) -> None:
    again = compare(iterations=ITERATIONS, seed=7)
    assert again.as_dict() == comparison.as_dict()


def test_every_design_reports_every_operation_in_order(comparison: Comparison) -> None:
    assert comparison.designs == ("native", "pv-identity", "pv-paging", "trap-emulate")
    for result in comparison.results:
        assert tuple(op.operation for op in result.operations) == OPERATIONS
        assert not result.problems, result.problems


# -- counts a design's rules fix ---------------------------------------------------------------------


def test_native_never_traps_nor_calls_a_hypervisor(comparison: Comparison) -> None:
    for op in comparison.result("native").operations:
        assert (op.total.traps, op.total.hypercalls, op.total.pool_pages) == (0, 0, 0), op.operation


def test_native_strict_unmap_is_one_tlbi_and_one_sync_behind_one_prod_write(comparison: Comparison) -> None:
    # Mapping needs no invalidation; a strict unmap of one page invalidates that page (one TLBI,
    # whatever the range support) and waits: one batch, so one CMDQ_PROD write.
    n, mapped = per_op(comparison, "native", "map 4K")
    assert n == ITERATIONS and mapped.command_total == 0
    n, unmapped = per_op(comparison, "native", "unmap 4K")
    assert dict(unmapped.commands) == {"TLBI_NH_VA": n, "SYNC": n}
    assert unmapped.mmio_writes == n
    assert unmapped.dma_api_calls == n


def test_native_device_dma_of_1m_misses_once_per_page_with_four_level_walks(comparison: Comparison) -> None:
    # A fresh 1 MiB IOVA range is mapped with 256 4 KiB leaves (no block fits); the device's first
    # pass misses on each page, the read-back hits; a 48-bit stage 1 walks levels 0..3.
    n, dma = per_op(comparison, "native", "dma 1M")
    assert dma.tlb_misses == 256 * n
    assert dma.walk_levels == 4 * 256 * n


def test_pv_paging_map_is_one_hypercall_and_no_trap(comparison: Comparison) -> None:
    for size in ("4K", "1M"):
        n, mapped = per_op(comparison, "pv-paging", f"map {size}")
        assert mapped.hypercalls == n
        assert dict(mapped.hypercall_names) == {"__pkvm_host_iommu_map_pages": n}
        assert (mapped.traps, mapped.command_total) == (0, 0)


def test_pv_paging_unmap_is_one_hypercall_whose_invalidation_the_hyp_issues(comparison: Comparison) -> None:
    n, unmapped = per_op(comparison, "pv-paging", "unmap 4K")
    assert dict(unmapped.hypercall_names) == {"__pkvm_host_iommu_unmap_pages": n}
    assert unmapped.traps == 0
    assert unmapped.syncs == n
    assert sum(v for k, v in unmapped.commands.items() if k.startswith("TLBI_")) == n


def test_pv_paging_refcounts_every_page_it_maps(comparison: Comparison) -> None:
    n, mapped = per_op(comparison, "pv-paging", "map 1M")
    assert mapped.page_state_pages == 256 * n  # host_use_dma on each page of the buffer


def test_trap_emulate_map_touches_only_host_memory(comparison: Comparison) -> None:
    # The host writes its own stage-1 tables: nothing traps, nothing reaches the hypervisor.
    for size in ("4K", "1M"):
        _, mapped = per_op(comparison, "trap-emulate", f"map {size}")
        assert (mapped.traps, mapped.hypercalls, mapped.command_total) == (0, 0, 0)


def test_trap_emulate_strict_unmap_goes_through_the_shadow_queue(comparison: Comparison) -> None:
    n, unmapped = per_op(comparison, "trap-emulate", "unmap 4K")
    assert unmapped.hypercalls == 0
    assert unmapped.traps >= n
    assert unmapped.trapped_registers.get("CMDQ_PROD", 0) >= n
    # What the hardware consumed: the host's TLBI and CMD_SYNC, copied into the shadow queue.
    assert dict(unmapped.commands) == {"TLBI_NH_VA": n, "SYNC": n}


def test_pv_identity_dma_api_is_dma_direct(comparison: Comparison) -> None:
    for operation in ("map 4K", "unmap 4K", "map 1M", "unmap 1M"):
        op = comparison.result("pv-identity").operation(operation)
        assert "dma-direct" in op.note
        assert op.total == OpCounts(), operation
        assert op.modeled_ns == 0


@pytest.mark.parametrize("design", PKVM_DESIGNS)
def test_donation_is_one_hypercall_and_invalidates_the_identity_stage2(
    comparison: Comparison, design: str
) -> None:
    n, donated = per_op(comparison, design, "donate")
    assert n == ITERATIONS
    assert dict(donated.hypercall_names) == {"__pkvm_host_donate_guest": n}
    assert donated.traps == 0
    assert donated.syncs >= n  # the page left the identity stage-2: invalidated before returning
    n, reclaimed = per_op(comparison, design, "reclaim")
    assert dict(reclaimed.hypercall_names) == {"__pkvm_host_reclaim_page": n}
    assert reclaimed.command_total == 0  # adding a mapping needs no invalidation


def test_native_has_no_donation(comparison: Comparison) -> None:
    for operation in ("donate", "reclaim"):
        op = comparison.result("native").operation(operation)
        assert not op.supported and "no hypervisor" in op.note


def test_boot_of_a_pkvm_design_builds_the_identity_stage2_from_the_pool(comparison: Comparison) -> None:
    for design in PKVM_DESIGNS:
        _, boot = per_op(comparison, design, "boot")
        assert boot.table_pages > 0 and boot.pool_pages >= boot.table_pages
        assert boot.pte_writes > boot.table_pages


# -- the oracle -----------------------------------------------------------------------------------------


def test_native_promises_nothing(comparison: Comparison) -> None:
    result = comparison.result("native")
    assert "not applicable" in result.isolation
    assert {op.isolation for op in result.operations} == {ISOLATION_NA}


def test_what_the_oracle_flags_on_the_default_platform_comes_from_the_ats_endpoint(
    comparison: Comparison,
) -> None:
    # The default platform's 00:02.0 has ATS on (StreamID 0x10).
    for design in PKVM_DESIGNS:
        for line in comparison.result(design).violations:
            assert "StreamID 0x10" in line and "ATS" in line, line


def test_without_ats_every_pkvm_design_isolates(tmp_path: Path) -> None:
    dts = tmp_path / "no-ats.dts"
    dts.write_text(platform_source().replace(",ats=on", ""))
    result = compare(PKVM_DESIGNS, iterations=1, seed=1, platform=str(dts))
    for design in result.results:
        assert design.isolation.startswith("isolated"), (design.design, design.violations)
        assert {op.isolation for op in design.operations if op.supported} == {"ok"}


# -- measuring from counters -----------------------------------------------------------------------------


def test_measure_sums_counted_fields_and_reads_only_the_buddy_pools() -> None:
    bus = TraceBus()
    counters = bus.attach(
        Counters(by_fields=("opcode", "levels", "pte_writes", "table_pages", "pages", "reg"))
    )
    before = counters.snapshot()
    bus.emit(SMMU, "cmd", opcode="TLBI_NH_VA")
    bus.emit(SMMU, "cmd", opcode="SYNC")
    bus.emit(SMMU, "walk", stage=1, levels=4)
    bus.emit(SMMU, "walk", stage=2, levels=3)
    bus.emit(SMMU, "tlb.miss", sid=8)
    bus.emit(SMMU, "reg.write", reg="CMDQ_PROD")
    bus.emit("arm-smmu-v3.x", "pgtable", op="map", pte_writes=3, table_pages=2)
    bus.emit("hyp.pv", "map", pte_writes=3, table_pages=0)
    bus.emit("hyp", "pool.alloc", pages=4)
    bus.emit("hyp", "pool.free", pages=1)
    bus.emit("hyp.iommu", "pool.alloc", pages=4)  # the same pages, one layer up
    bus.emit("hyp", "trap", address=0x9050098)
    bus.emit("hyp.smmuv3", "trap", reg="CMDQ_PROD")
    bus.emit("hyp", "hypercall", name="x")
    counts = measure(Counters.diff(before, counters.snapshot()), [SMMU])
    assert dict(counts.commands) == {"TLBI_NH_VA": 1, "SYNC": 1}
    assert (counts.syncs, counts.walk_levels, counts.tlb_misses, counts.mmio_writes) == (1, 7, 1, 1)
    assert (counts.pte_writes, counts.table_pages, counts.pool_pages) == (6, 2, 3)
    assert (counts.traps, counts.hypercalls, dict(counts.trapped_registers)) == (1, 1, {"CMDQ_PROD": 1})


def test_op_counts_add_up() -> None:
    a = OpCounts(traps=1, commands={"SYNC": 1}, hypercall_names={"m": 1})
    b = OpCounts(traps=2, commands={"SYNC": 1, "TLBI_NH_VA": 2})
    total = a + b
    assert total.traps == 3 and dict(total.commands) == {"SYNC": 2, "TLBI_NH_VA": 2}
    assert total.command_total == 4 and dict(total.hypercall_names) == {"m": 1}


def test_bad_requests_name_their_option() -> None:
    with pytest.raises(CompareError) as bad:
        compare(["native", "nope"])
    assert bad.value.option == "--designs" and "nope" in str(bad.value)
    with pytest.raises(CompareError) as bad:
        compare(["native"], iterations=0)
    assert bad.value.option == "--iterations"


# -- the cost model ---------------------------------------------------------------------------------------


def test_every_default_cost_is_the_calibrated_one() -> None:
    model = CostModel()
    calibrated = {entry.parameter: entry.value_ns for entry in CALIBRATION}
    assert calibrated == model.parameters()
    for entry in CALIBRATION:
        assert entry.derivation
        if not entry.derivation.startswith("Assumed"):
            assert entry.sources, entry.parameter


def test_modeled_time_is_linear_in_the_counts() -> None:
    model = CostModel()
    counts = PricedCounts(traps=2, hypercalls=1, commands=2, syncs=1, pte_writes=10, walk_levels=4)
    expected = (
        2 * model.trap_ns + model.hypercall_ns + 2 * model.command_ns + model.sync_wait_ns
        + 10 * model.pte_write_ns + 4 * model.walk_level_ns
    )  # fmt: skip
    assert model.time_ns(counts) == pytest.approx(expected)
    assert set(model.breakdown(counts)) == {
        "traps",
        "hypercalls",
        "commands",
        "syncs",
        "pte_writes",
        "walk_levels",
    }
    assert model.with_overrides(trap_ns=0).time_ns(PricedCounts(traps=5)) == 0
    with pytest.raises(ValueError, match="bogus_ns"):
        model.with_overrides(bogus_ns=1)


def test_the_model_reproduces_the_native_numbers_it_was_calibrated_on(comparison: Comparison) -> None:
    # map 4K/1M and unmap 4K are calibration points; unmap 1M is not (the model's SMMU has range
    # invalidation, Morello's did not): see docs/design-comparison.md.
    rows = {f"{row.operation} {row.size}": row for row in comparison.rfc_v2()}
    assert [m.ratio for m in RFC_V2_MORELLO] == [
        rows[f"{m.operation} {m.size}"].measured_ratio for m in RFC_V2_MORELLO
    ]
    for case in ("map 4K", "unmap 4K", "map 1M"):
        assert rows[case].model_native_us == pytest.approx(rows[case].measured_native_us, rel=0.1), case
    for row in rows.values():
        assert row.model_ratio > 1  # pv-paging never beats native
