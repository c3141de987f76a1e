"""Every granule x (ias, oas) x stage: map, overlap, translate, read back by hand, unmap, remap.

Expected geometry and descriptor values are computed here from the Arm ARM's formulas and bit
positions; descriptors are read straight from RAM and decoded with the arch layouts.
"""

from __future__ import annotations

import errno
import itertools

import pytest

from pkvm_smmu.arch.vmsa import GRANULE_4K, GRANULE_16K, GRANULE_64K, S1_LEAF, S2_LEAF, TABLE_DESC, Granule
from pkvm_smmu.pgtable import IotlbGather, PageTableConfig, Prot

SIZES = (32, 36, 40, 42, 44, 48)
PAIRS = [(ias, oas) for ias, oas in itertools.product(SIZES, SIZES) if ias <= oas]
RW_CACHE = Prot.READ | Prot.WRITE | Prot.CACHE

# Leaf sizes the granule permits at <= 48-bit OA (Arm ARM: 4K L1/L2 blocks, 16K/64K L2 blocks).
LEAF_SIZES = {
    12: {1 << 12, 1 << 21, 1 << 30},
    14: {1 << 14, 1 << 25},
    16: {1 << 16, 1 << 29},
}


def level_shift(shift: int, level: int) -> int:
    return shift + (3 - level) * (shift - 3)


def expected_start(stage: int, shift: int, ias: int, oas: int) -> tuple[int, int]:
    """(start level, concatenated tables): the S1 formula, then Linux's mandatory S2 concatenation."""
    stride = shift - 3
    start = 4 - (ias - 4) // stride
    if stage == 2 and (
        (shift == 12 and start == 0 and oas in (40, 42))
        or (shift == 14 and start == 0 and 48 in (ias, oas))
        or (shift == 14 and start == 1 and oas == 40)
    ):
        return start + 1, 1 << (ias - level_shift(shift, start))
    return start, 1


def hand_walk(rig, shift: int, start: int, ias: int, iova: int) -> tuple[int, int] | None:
    """(level, descriptor) of the leaf translating ``iova``, read from RAM by hand."""
    table = rig.table.root
    for level in range(start, 4):
        lshift = level_shift(shift, level)
        bits = ias - lshift if level == start else shift - 3
        desc = rig.u64(table + 8 * ((iova >> lshift) & ((1 << bits) - 1)))
        if not desc & 1:
            return None
        if level < 3 and desc & 2:
            table = TABLE_DESC.NLTA.get_address(desc)
            continue
        return level, desc
    raise AssertionError("walk ran past level 3")


def expected_leaf(stage: int, level: int, paddr: int) -> int:
    """RW, cacheable leaf as Linux builds it, from the spec's bit positions."""
    type_bits = 0b11 if level == 3 else 0b01
    af, sh_is = 1 << 10, 0b11 << 8
    if stage == 1:
        # AttrIndx=1 (MAIR write-back), AP=0b01 (RW at EL1 and EL0), nG
        return paddr | type_bits | (1 << 2) | (0b01 << 6) | sh_is | af | (1 << 11)
    # MemAttr=0b1111 (outer/inner write-back), S2AP=0b11 (RW)
    return paddr | type_bits | (0xF << 2) | (0b11 << 6) | sh_is | af


CASES = [
    pytest.param(stage, granule, ias, oas, id=f"s{stage}-{granule.size // 1024}K-ias{ias}-oas{oas}")
    for stage in (1, 2)
    for granule in (GRANULE_4K, GRANULE_16K, GRANULE_64K)
    for ias, oas in PAIRS
]


@pytest.mark.parametrize(("stage", "granule", "ias", "oas"), CASES)
def test_map_unmap_matrix(make_rig, stage: int, granule: Granule, ias: int, oas: int) -> None:
    shift = granule.shift
    config = PageTableConfig(stage=stage, granule=granule, ias=ias, oas=oas)
    start, tables = expected_start(stage, shift, ias, oas)
    assert (config.start_level, config.start_tables) == (start, tables)
    assert config.pgsize_bitmap == sum(LEAF_SIZES[shift])
    rig = make_rig(config, flush=True)  # lets a block replace a table emptied by an earlier unmap
    table = rig.table
    layout = S1_LEAF if stage == 1 else S2_LEAF

    # empty: nothing translates
    for probe in (0, 1 << (ias - 1), (1 << ias) - 1):
        assert table.iova_to_phys(probe) is None
        assert hand_walk(rig, shift, start, ias, probe) is None
    assert list(table.walk_leaves()) == []

    for size in sorted(LEAF_SIZES[shift]):
        level = next(lvl for lvl in range(4) if level_shift(shift, lvl) == size.bit_length() - 1)
        iova = 3 * size
        paddr = (1 << oas) - 2 * size

        assert table.map(iova, paddr, size, RW_CACHE) == (size, 0)
        assert table.iova_to_phys(iova) == paddr
        assert table.iova_to_phys(iova + size // 2 + 0x18) == paddr + size // 2 + 0x18
        assert table.iova_to_phys(iova + size) is None
        assert table.iova_to_phys(iova - 1) is None
        found = hand_walk(rig, shift, start, ias, iova + size - 1)
        assert found is not None
        assert found == (level, expected_leaf(stage, level, paddr))
        assert layout.decode(found[1])["AF"] == 1
        assert layout.OA.get_address(found[1]) == paddr

        # overlaps: the same range, a smaller page inside it, a larger block around it
        assert table.map(iova, 0, size, RW_CACHE) == (0, -errno.EEXIST)
        if size > granule.size:
            assert table.map(iova + granule.size, 0, granule.size, Prot.READ) == (0, -errno.EEXIST)
        for bigger in sorted(s for s in LEAF_SIZES[shift] if s > size):
            around = iova & ~(bigger - 1)
            assert table.map(around, 0, bigger, RW_CACHE) == (0, -errno.EEXIST)
        assert table.iova_to_phys(iova) == paddr

        gather = IotlbGather()
        assert table.unmap(iova, size, gather) == size
        assert [(r.start, r.end, r.pgsize) for r in gather.ranges] == [(iova, iova + size, size)]
        assert gather.leaf_only
        assert table.iova_to_phys(iova) is None
        assert hand_walk(rig, shift, start, ias, iova) is None
        assert table.unmap(iova, size) == 0

        assert table.map(iova, paddr, size, RW_CACHE) == (size, 0)
        assert hand_walk(rig, shift, start, ias, iova) == (level, expected_leaf(stage, level, paddr))
        assert table.unmap(iova, size) == size

        # the last block below 2^ias, and the first beyond
        last = (1 << ias) - size
        assert table.map(last, paddr, size, RW_CACHE) == (size, 0)
        assert table.iova_to_phys((1 << ias) - 1) == paddr + size - 1
        assert hand_walk(rig, shift, start, ias, last) == (level, expected_leaf(stage, level, paddr))
        assert table.map(1 << ias, paddr, size, RW_CACHE) == (0, -errno.ERANGE)
        assert table.map(0, 1 << oas, size, RW_CACHE) == (0, -errno.ERANGE)
        assert table.unmap(last, size) == size

    assert list(table.walk_leaves()) == []
