"""PageTableConfig: start levels, stage-2 concatenation, page sizes and the register fields."""

from __future__ import annotations

import pytest

from pkvm_smmu.arch.vmsa import GRANULE_4K, GRANULE_16K, GRANULE_64K
from pkvm_smmu.pgtable import PageTableConfig, S2Concat

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(
    ("granule", "ias", "oas", "concat", "start", "tables", "sl0"),
    [
        # 4K, 40-bit IPA: level 0 has 2 entries; Arm requires L1 with 2 tables for a 40-bit PA
        (GRANULE_4K, 40, 40, S2Concat.REQUIRED, 1, 2, 1),
        (GRANULE_4K, 42, 42, S2Concat.REQUIRED, 1, 8, 1),
        (GRANULE_4K, 40, 48, S2Concat.REQUIRED, 0, 1, 2),
        (GRANULE_4K, 40, 48, S2Concat.WHEN_POSSIBLE, 1, 2, 1),
        (GRANULE_4K, 43, 48, S2Concat.WHEN_POSSIBLE, 1, 16, 1),
        (GRANULE_4K, 44, 48, S2Concat.WHEN_POSSIBLE, 0, 1, 2),  # 32 > 16
        (GRANULE_4K, 48, 48, S2Concat.WHEN_POSSIBLE, 0, 1, 2),  # 512 > 16
        (GRANULE_4K, 36, 36, S2Concat.REQUIRED, 1, 1, 1),
        (GRANULE_4K, 32, 32, S2Concat.REQUIRED, 1, 1, 1),
        (GRANULE_16K, 48, 48, S2Concat.REQUIRED, 1, 2, 2),  # 16K never starts at L0 without DS
        (GRANULE_16K, 40, 40, S2Concat.REQUIRED, 2, 16, 1),
        (GRANULE_16K, 40, 48, S2Concat.REQUIRED, 1, 1, 2),
        (GRANULE_64K, 48, 48, S2Concat.REQUIRED, 1, 1, 2),
        (GRANULE_64K, 42, 42, S2Concat.REQUIRED, 2, 1, 1),
    ],
)
def test_stage2_start_and_concatenation(granule, ias, oas, concat, start, tables, sl0) -> None:
    config = PageTableConfig(stage=2, granule=granule, ias=ias, oas=oas, s2_concat=concat)
    assert (config.start_level, config.start_tables) == (start, tables)
    assert config.vtcr_fields()["S2SL0"] == sl0
    assert config.pgd_pages == tables


def test_concatenated_pgd_in_memory(make_rig) -> None:
    rig = make_rig(PageTableConfig(stage=2, granule=GRANULE_4K, ias=40, oas=40))
    root = rig.table.root
    assert root % (2 * 4 * KiB) == 0  # two tables, aligned to their total size
    iova = (1 << 39) + 3 * GiB  # bit 39 selects the second table, bits [38:30] = 3
    assert rig.table.map(iova, 5 * GiB, GiB, 0b11) == (GiB, 0)
    desc = rig.u64(root + 4 * KiB + 3 * 8)
    assert desc & 0b11 == 0b01 and desc & 0xFFFF_C000_0000 == 5 * GiB
    assert rig.table.iova_to_phys(iova + 12345) == 5 * GiB + 12345


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stage": 3, "granule": GRANULE_4K, "ias": 48, "oas": 48},
        {"stage": 1, "granule": GRANULE_4K, "ias": 48, "oas": 52},  # 52-bit OA needs 64K here
        {"stage": 1, "granule": GRANULE_4K, "ias": 48, "oas": 39},
        {"stage": 1, "granule": GRANULE_4K, "ias": 49, "oas": 48},
        {"stage": 1, "granule": GRANULE_4K, "ias": 12, "oas": 48},
        {"stage": 1, "granule": GRANULE_16K, "ias": 48, "oas": 48, "pgsize_bitmap": 2 * MiB},
        {"stage": 1, "granule": GRANULE_4K, "ias": 48, "oas": 48, "pgsize_bitmap": 2 * MiB},
        {"stage": 2, "granule": GRANULE_16K, "ias": 48, "oas": 48, "s2_concat": S2Concat.NEVER},
        {"stage": 2, "granule": GRANULE_4K, "ias": 48, "oas": 40},  # 512 tables would be required
    ],
)
def test_invalid_configs(kwargs) -> None:
    with pytest.raises(ValueError):
        PageTableConfig(**kwargs)


def test_default_page_sizes() -> None:
    assert PageTableConfig(1, GRANULE_4K, 48, 48).pgsize_bitmap == 4 * KiB | 2 * MiB | GiB
    assert PageTableConfig(1, GRANULE_16K, 48, 48).pgsize_bitmap == 16 * KiB | 32 * MiB
    assert PageTableConfig(1, GRANULE_64K, 48, 48).pgsize_bitmap == 64 * KiB | 512 * MiB
    # a 30-bit input starts at L2: 1G blocks are unreachable
    assert PageTableConfig(1, GRANULE_4K, 30, 48).pgsize_bitmap == 4 * KiB | 2 * MiB


def test_cd_fields() -> None:
    fields = PageTableConfig(1, GRANULE_4K, 48, 44).cd_fields()
    assert fields == {
        "T0SZ": 16,
        "TG0": 0,
        "IR0": 1,  # write-back write-allocate walks
        "OR0": 1,
        "SH0": 3,  # inner shareable
        "EPD0": 0,
        "EPD1": 1,
        "IPS": 4,  # 44 bits
        "AA64": 1,
        "MAIR0": 0xF404FF44,
        "MAIR1": 0,
    }
    assert PageTableConfig(1, GRANULE_64K, 39, 48).cd_fields()["TG0"] == 1
    assert PageTableConfig(1, GRANULE_16K, 36, 32).cd_fields()["TG0"] == 2
    assert PageTableConfig(1, GRANULE_16K, 36, 32).cd_fields()["T0SZ"] == 28
    nc = PageTableConfig(1, GRANULE_4K, 48, 48, coherent_walk=False).cd_fields()
    assert (nc["IR0"], nc["OR0"], nc["SH0"], nc["IPS"]) == (0, 0, 2, 5)
    with pytest.raises(ValueError):
        PageTableConfig(2, GRANULE_4K, 48, 48).cd_fields()


def test_vtcr_fields() -> None:
    fields = PageTableConfig(2, GRANULE_64K, 48, 48).vtcr_fields()
    assert fields == {
        "S2T0SZ": 16,
        "S2SL0": 2,  # 64K: SL0=2 is level 1
        "S2TG": 1,
        "S2PS": 5,
        "S2IR0": 1,
        "S2OR0": 1,
        "S2SH0": 3,
        "S2AA64": 1,
    }
    fields = PageTableConfig(2, GRANULE_4K, 36, 40, coherent_walk=False).vtcr_fields()
    assert (fields["S2T0SZ"], fields["S2SL0"], fields["S2TG"], fields["S2PS"]) == (28, 1, 0, 2)
    assert (fields["S2IR0"], fields["S2OR0"], fields["S2SH0"]) == (0, 0, 2)
    with pytest.raises(ValueError):
        PageTableConfig(1, GRANULE_4K, 48, 48).vtcr_fields()
