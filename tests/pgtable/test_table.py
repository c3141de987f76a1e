"""IoPageTable behaviour: page-size choice, errors, block splitting, gathers, table freeing."""

from __future__ import annotations

import errno

import pytest

from pkvm_smmu.arch.vmsa import GRANULE_4K, GRANULE_64K
from pkvm_smmu.pgtable import IoPageTable, IotlbGather, PageTableConfig, Prot

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RW = Prot.READ | Prot.WRITE
RWC = RW | Prot.CACHE


def s2_4k(**kw) -> PageTableConfig:
    return PageTableConfig(stage=2, granule=GRANULE_4K, ias=48, oas=48, **kw)


def leaves(table) -> list[tuple[int, int, int]]:
    return [(leaf.iova, leaf.size, leaf.level) for leaf in table.walk_leaves()]


def l3_table_of(rig, iova: int) -> int:
    """Physical address of the level-3 table holding ``iova`` (4K, 48-bit: walk L0-L2 by hand)."""
    table = rig.table.root
    for shift in (39, 30, 21):
        desc = rig.u64(table + 8 * ((iova >> shift) & 511))
        assert desc & 3 == 3
        table = desc & 0xFFFF_FFFF_F000
    return table


# -- page-size selection ------------------------------------------------------------------------


def test_largest_page_size_that_fits(make_rig) -> None:
    rig = make_rig(s2_4k())
    base = GiB - 4 * KiB
    size = 4 * KiB + GiB + 2 * MiB + 4 * KiB
    assert rig.table.map(base, base, size, RW) == (size, 0)
    assert leaves(rig.table) == [
        (base, 4 * KiB, 3),
        (GiB, GiB, 1),
        (2 * GiB, 2 * MiB, 2),
        (2 * GiB + 2 * MiB, 4 * KiB, 3),
    ]


def test_blocks_need_iova_and_paddr_equally_aligned(make_rig) -> None:
    rig = make_rig(s2_4k())
    assert rig.table.map(2 * MiB, 4 * MiB + 4 * KiB, 2 * MiB, RW) == (2 * MiB, 0)
    found = leaves(rig.table)
    assert len(found) == 512 and {lvl for _, _, lvl in found} == {3}
    assert rig.table.iova_to_phys(3 * MiB + 5) == 5 * MiB + 4 * KiB + 5


def test_pgsize_bitmap_restricts_sizes(make_rig) -> None:
    rig = make_rig(s2_4k(pgsize_bitmap=4 * KiB | GiB))
    assert rig.table.map(0, 0, GiB + 2 * MiB, RW) == (GiB + 2 * MiB, 0)
    assert leaves(rig.table)[0] == (0, GiB, 1)
    assert len(leaves(rig.table)) == 1 + 512


# -- argument errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iova", "paddr", "size", "prot", "error"),
    [
        (0, 0, 4 * KiB, Prot.NONE, -errno.EINVAL),
        (0, 0, 4 * KiB, Prot.CACHE | Prot.NOEXEC, -errno.EINVAL),
        (0x800, 0, 4 * KiB, RW, -errno.EINVAL),
        (0, 0x800, 4 * KiB, RW, -errno.EINVAL),
        (0, 0, 6 * KiB, RW, -errno.EINVAL),
        (0, 0, 0, RW, -errno.EINVAL),
        (-4 * KiB, 0, 4 * KiB, RW, -errno.EINVAL),
        (0, -4 * KiB, 4 * KiB, RW, -errno.EINVAL),
        (1 << 48, 0, 4 * KiB, RW, -errno.ERANGE),
        ((1 << 48) - 4 * KiB, 0, 8 * KiB, RW, -errno.ERANGE),
        (0, 1 << 48, 4 * KiB, RW, -errno.ERANGE),
        (0, (1 << 48) - 4 * KiB, 8 * KiB, RW, -errno.ERANGE),
    ],
)
def test_map_rejects_bad_arguments(make_rig, iova, paddr, size, prot, error) -> None:
    rig = make_rig(s2_4k())
    writes, pages = rig.table.pte_writes, rig.table.pages_allocated
    assert rig.table.map(iova, paddr, size, prot) == (0, error)
    assert (rig.table.pte_writes, rig.table.pages_allocated) == (writes, pages)


@pytest.mark.parametrize(
    ("iova", "size"), [(0x800, 4 * KiB), (0, 0), (0, 2 * KiB), (-4 * KiB, 4 * KiB), (1 << 48, 4 * KiB)]
)
def test_unmap_rejects_bad_arguments(make_rig, iova, size) -> None:
    rig = make_rig(s2_4k())
    assert rig.table.map(0, 0, 8 * KiB, RW) == (8 * KiB, 0)
    assert rig.table.unmap(iova, size) == 0
    assert rig.table.iova_to_phys(0) == 0


def test_unmap_stops_at_a_hole(make_rig) -> None:
    rig = make_rig(s2_4k())
    rig.table.map(0, 0, 8 * KiB, RW)
    rig.table.map(12 * KiB, 12 * KiB, 4 * KiB, RW)
    assert rig.table.unmap(0, 16 * KiB) == 8 * KiB
    assert rig.table.iova_to_phys(12 * KiB) == 12 * KiB


# -- blocks -------------------------------------------------------------------------------------


def test_partial_unmap_of_a_block_unmaps_nothing(make_rig) -> None:
    rig = make_rig(s2_4k())
    assert rig.table.map(2 * MiB, 8 * MiB, 2 * MiB, RW) == (2 * MiB, 0)
    gather = IotlbGather()
    assert rig.table.unmap(2 * MiB + 4 * KiB, 4 * KiB, gather) == 0
    assert rig.table.unmap(2 * MiB, 4 * KiB, gather) == 0
    assert gather.empty
    assert rig.table.iova_to_phys(2 * MiB + 4 * KiB) == 8 * MiB + 4 * KiB
    # a range the block fits in, then a hole: the block goes, the hole stops it
    assert rig.table.unmap(2 * MiB, 4 * MiB) == 2 * MiB
    assert rig.table.iova_to_phys(2 * MiB) is None


def test_split_blocks_splits_and_keeps_the_rest(make_rig) -> None:
    rig = make_rig(s2_4k(split_blocks=True))
    table = rig.table
    assert table.map(GiB, 4 * GiB, GiB, RW | Prot.NOEXEC) == (GiB, 0)
    block_attrs = next(table.walk_leaves()).desc & ~0xFFFF_FFFF_F003
    hole = GiB + 2 * MiB + 4 * KiB
    gather = IotlbGather()
    assert table.unmap(hole, 4 * KiB, gather) == 4 * KiB
    assert table.iova_to_phys(hole) is None
    assert table.iova_to_phys(hole - 4 * KiB) == 4 * GiB + 2 * MiB
    assert table.iova_to_phys(hole + 4 * KiB + 7) == 4 * GiB + 2 * MiB + 8 * KiB + 7
    assert table.iova_to_phys(2 * GiB - 1) == 5 * GiB - 1
    found = leaves(table)
    assert sum(size for _, size, _ in found) == GiB - 4 * KiB
    assert sum(1 for _, _, lvl in found if lvl == 2) == 511
    assert sum(1 for _, _, lvl in found if lvl == 3) == 511
    assert {leaf.desc & ~0xFFFF_FFFF_F003 for leaf in table.walk_leaves()} == {block_attrs}
    # the TLB may hold the 1G block, then the 2M block it became: each is invalidated at its size
    assert [(r.start, r.end, r.pgsize) for r in gather.ranges] == [
        (GiB, 2 * GiB, GiB),
        (GiB + 2 * MiB, GiB + 4 * MiB, 2 * MiB),
        (hole, hole + 4 * KiB, 4 * KiB),
    ]
    assert gather.leaf_only and gather.pgsize is None
    # another 2M block of the split table unmaps whole
    assert table.unmap(GiB + 10 * MiB, 2 * MiB) == 2 * MiB


def test_split_without_memory_unmaps_nothing(make_rig) -> None:
    rig = make_rig(s2_4k(split_blocks=True), table_pages=2)  # pgd + one L1 table
    assert rig.table.map(GiB, GiB, GiB, RW) == (GiB, 0)
    assert rig.table.unmap(GiB, 4 * KiB) == 0
    assert rig.table.iova_to_phys(GiB + 4 * KiB) == GiB + 4 * KiB


# -- memory exhaustion --------------------------------------------------------------------------


def test_enomem_leaves_the_table_consistent(make_rig) -> None:
    rig = make_rig(s2_4k(pgsize_bitmap=4 * KiB), table_pages=4)  # L0, L1, L2 and one L3 table
    table = rig.table
    assert table.map(0, 16 * MiB, 4 * MiB, RW) == (2 * MiB, -errno.ENOMEM)
    assert rig.allocator.pages_free == 0 and table.pages_allocated == 4
    found = leaves(table)
    assert len(found) == 512 and found[0][0] == 0 and found[-1][0] == 2 * MiB - 4 * KiB
    assert table.iova_to_phys(2 * MiB - 1) == 18 * MiB - 1
    assert table.iova_to_phys(2 * MiB) is None
    assert table.map(2 * MiB, 0, 4 * KiB, RW) == (0, -errno.ENOMEM)
    assert table.unmap(0, 2 * MiB) == 2 * MiB
    assert leaves(table) == []


def test_pgd_allocation_failure_raises(make_rig) -> None:
    rig = make_rig(s2_4k(), table_pages=1)
    with pytest.raises(MemoryError):
        IoPageTable(s2_4k(), rig.memory, rig.allocator)


# -- gathers and table freeing ------------------------------------------------------------------


def test_gather_after_leaf_unmap(make_rig) -> None:
    rig = make_rig(s2_4k())
    rig.table.map(64 * KiB, 64 * KiB, 16 * KiB, RW)
    gather = IotlbGather()
    assert rig.table.unmap(64 * KiB, 12 * KiB, gather) == 12 * KiB
    assert gather.ranges == [(64 * KiB, 76 * KiB, 4 * KiB, True)]
    assert (gather.start, gather.end, gather.pgsize) == (64 * KiB, 76 * KiB, 4 * KiB)
    assert gather.leaf_only and gather.freed_tables == []
    gather.reset()
    assert gather.empty and gather.start is None


def test_block_sized_unmap_of_a_table_defers_its_free(make_rig) -> None:
    rig = make_rig(s2_4k())
    table = rig.table
    table.map(2 * MiB, 2 * MiB, 2 * MiB - 4 * KiB, RW | Prot.NOEXEC)  # 511 pages in one L3 table
    l3 = l3_table_of(rig, 2 * MiB)
    pages = table.pages_allocated
    gather = IotlbGather()
    assert table.unmap(2 * MiB, 2 * MiB, gather) == 2 * MiB
    assert table.iova_to_phys(4 * MiB - 4 * KiB) is None
    assert not gather.leaf_only
    assert gather.freed_tables == [l3]
    assert (2 * MiB, 4 * MiB, 4 * KiB, False) in gather.ranges
    assert (2 * MiB, 4 * MiB, 2 * MiB, True) in gather.ranges
    assert table.pages_allocated == pages  # still held until the invalidation is done
    assert table.release_freed_tables(gather) == 1
    assert table.pages_allocated == pages - 1 and gather.freed_tables == []
    assert rig.allocator.alloc_page() == l3


def test_block_sized_unmap_with_flush_ops_frees_at_once(make_rig) -> None:
    rig = make_rig(s2_4k(), flush=True)
    table = rig.table
    table.map(2 * MiB, 2 * MiB, 2 * MiB - 4 * KiB, RW)
    pages = table.pages_allocated
    gather = IotlbGather()
    assert table.unmap(2 * MiB, 2 * MiB, gather) == 2 * MiB
    assert rig.flush.calls == [(2 * MiB, 2 * MiB, 4 * KiB)]
    assert table.pages_allocated == pages - 1
    assert gather.freed_tables == [] and gather.leaf_only


def test_free_empty_tables(make_rig) -> None:
    rig = make_rig(s2_4k(free_empty_tables=True))
    table = rig.table
    iova = (5 << 39) | (7 << 30) | (9 << 21) | (11 << 12)
    table.map(iova, 0, 8 * KiB, RW)
    assert table.pages_allocated == 4
    gather = IotlbGather()
    assert table.unmap(iova, 4 * KiB, gather) == 4 * KiB
    assert gather.freed_tables == []  # the L3 table still maps a page
    assert table.unmap(iova + 4 * KiB, 4 * KiB, gather) == 4 * KiB
    assert len(gather.freed_tables) == 3
    assert rig.u64(table.root + 5 * 8) == 0
    assert not gather.leaf_only
    assert (iova & ~(GiB - 1), (iova & ~(GiB - 1)) + GiB, 4 * KiB, False) in gather.ranges
    assert table.release_freed_tables(gather) == 3
    assert table.pages_allocated == 1


def test_map_over_an_empty_table(make_rig) -> None:
    plain = make_rig(s2_4k())
    plain.table.map(0, 0, 4 * KiB, RW)
    plain.table.unmap(0, 4 * KiB)
    assert plain.table.map(0, 0, 2 * MiB, RW) == (0, -errno.EEXIST)  # no way to flush the walk
    flushing = make_rig(s2_4k(), flush=True)
    flushing.table.map(0, 0, 4 * KiB, RW)
    flushing.table.unmap(0, 4 * KiB)
    pages = flushing.table.pages_allocated
    assert flushing.table.map(0, 0, 2 * MiB, RW) == (2 * MiB, 0)
    assert flushing.flush.calls == [(0, 2 * MiB, 4 * KiB)]
    assert flushing.table.pages_allocated == pages - 1
    assert leaves(flushing.table) == [(0, 2 * MiB, 2)]


def test_map_over_a_table_in_use_is_eexist(make_rig) -> None:
    rig = make_rig(s2_4k(), flush=True)
    rig.table.map(GiB + 8 * MiB, 0, 4 * KiB, RW)
    assert rig.table.map(GiB, 0, GiB, RW) == (0, -errno.EEXIST)
    assert rig.table.map(GiB + 8 * MiB, 0, 2 * MiB, RW) == (0, -errno.EEXIST)
    assert rig.flush.calls == []
    assert rig.table.iova_to_phys(GiB + 8 * MiB) == 0


# -- lookups ------------------------------------------------------------------------------------


def test_reserved_encodings_translate_nothing(make_rig) -> None:
    rig = make_rig(s2_4k())
    table = rig.table
    table.map(0, 0, 4 * KiB, RW)
    l3 = l3_table_of(rig, 0)
    rig.bus.ram.write_int(l3 + 8, 8, 0x2000 | 0b01 | (0b11 << 6) | (1 << 10))  # 01 at level 3
    rig.bus.ram.write_int(table.root + 8, 8, (1 << 39) | 0b01 | (0b11 << 6) | (1 << 10))  # L0 block
    assert table.iova_to_phys(4 * KiB) is None
    assert table.iova_to_phys(1 << 39) is None
    assert leaves(table) == [(0, 4 * KiB, 3)]


def test_walk_leaves_range(make_rig) -> None:
    rig = make_rig(s2_4k())
    rig.table.map(0, 0, 4 * MiB, RW)
    rig.table.map(GiB, 0, 16 * KiB, RW)
    assert [iova for iova, _, _ in leaves(rig.table)] == [
        0,
        2 * MiB,
        GiB,
        GiB + 4 * KiB,
        GiB + 8 * KiB,
        GiB + 12 * KiB,
    ]
    inside = [leaf.iova for leaf in rig.table.walk_leaves(3 * MiB, GiB + 5 * KiB)]
    assert inside == [2 * MiB, GiB, GiB + 4 * KiB]


def test_walk_runs_groups_contiguous_leaves(make_rig) -> None:
    rig = make_rig(s2_4k(pgsize_bitmap=4 * KiB))
    table = rig.table
    table.map(0, 64 * MiB, 8 * MiB, RW)
    table.map(8 * MiB, 80 * MiB, 4 * MiB, RW)  # contiguous input, discontiguous output
    runs = [(r.iova, r.pgsize, r.entries, r.level, r.desc & 0xFFFF_FFFF_F000) for r in table.walk_runs()]
    assert runs == [(0, 4 * KiB, 2048, 3, 64 * MiB), (8 * MiB, 4 * KiB, 1024, 3, 80 * MiB)]
    table.unmap(MiB, 4 * KiB)
    table.map(MiB, MiB, 4 * KiB, RW)  # in place, but pointing elsewhere
    sizes = [(r.iova, r.entries) for r in table.walk_runs()]
    assert sizes == [(0, 256), (MiB, 1), (MiB + 4 * KiB, 1791), (8 * MiB, 1024)]
    assert [(r.iova, r.entries) for r in table.walk_runs(2 * MiB, 9 * MiB)] == [
        (2 * MiB, 1536),
        (8 * MiB, 256),
    ]


def test_table_pages_and_free_all(make_rig) -> None:
    rig = make_rig(s2_4k())
    rig.table.map(0, 0, 8 * KiB, RW)
    rig.table.map(1 << 40, 0, 4 * KiB, RW)
    pages = rig.table.table_pages()
    assert pages[0] == rig.table.root and len(pages) == 7 == rig.table.pages_allocated
    assert rig.allocator.pages_in_use == 7
    rig.table.free_all()
    assert rig.allocator.pages_in_use == 0 and rig.table.pages_allocated == 0


def test_52_bit_output_with_64k_granule(make_rig) -> None:
    config = PageTableConfig(stage=1, granule=GRANULE_64K, ias=48, oas=52)
    assert config.pgsize_bitmap == (64 * KiB) | (512 * MiB) | (1 << 42)
    rig = make_rig(config)
    paddr = 0xA_1234_5678_0000
    assert rig.table.map(0x10000, paddr, 64 * KiB, RW) == (64 * KiB, 0)
    desc = next(rig.table.walk_leaves()).desc
    assert (desc >> 12) & 0xF == 0xA  # OA[51:48] in bits [15:12]
    assert desc & 0xFFFF_FFFF_0000 == 0x1234_5678_0000
    assert rig.table.iova_to_phys(0x10123) == paddr + 0x123
    # a 4 TB block at level 1, whose output crosses 2^48 per entry
    assert rig.table.map(1 << 43, (1 << 48) - (1 << 42), 1 << 43, RW) == (1 << 43, 0)
    assert rig.table.iova_to_phys((1 << 43) + 5) == (1 << 48) - (1 << 42) + 5
    assert rig.table.iova_to_phys((1 << 43) + (1 << 42) + 5) == (1 << 48) + 5
