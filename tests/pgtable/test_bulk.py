"""Property tests: the bulk map path against entry-by-entry mapping, against the greedy page-size
decomposition, and random map/unmap sequences against a page dictionary."""

from __future__ import annotations

import errno

from hypothesis import example, given
from hypothesis import strategies as st

from pkvm_smmu.arch.vmsa import GRANULE_4K, GRANULE_16K, GRANULE_64K
from pkvm_smmu.pgtable import PageTableConfig, Prot

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RW = Prot.READ | Prot.WRITE


@given(
    granule=st.sampled_from([GRANULE_4K, GRANULE_16K, GRANULE_64K]),
    stage=st.sampled_from([1, 2]),
    first=st.integers(0, 3 * 2048),
    count=st.integers(1, 1200),
    delta=st.integers(0, 1 << 20),
    neighbour=st.booleans(),
)
def test_bulk_equals_entry_by_entry(make_rig, granule, stage, first, count, delta, neighbour) -> None:
    g = granule.size
    config = PageTableConfig(stage=stage, granule=granule, ias=48, oas=48, pgsize_bitmap=g)
    iova, paddr = (first + 1) * g, (first + 1 + delta) * g
    rigs = [make_rig(config, 64), make_rig(config, 64)]
    for rig in rigs:
        if neighbour:  # an existing entry in the same table: the bulk path must check, not assume
            assert rig.table.map(iova - g, 0, g, Prot.READ) == (g, 0)
    assert rigs[0].table.map(iova, paddr, count * g, RW) == (count * g, 0)
    for i in range(count):
        assert rigs[1].table.map(iova + i * g, paddr + i * g, g, RW) == (g, 0)
    a, b = (rig.table for rig in rigs)
    assert a.pages_allocated == b.pages_allocated
    assert a.pte_writes == b.pte_writes
    assert a.table_pages() == b.table_pages()
    for pa in a.table_pages():
        assert rigs[0].bus.ram.read(pa, g) == rigs[1].bus.ram.read(pa, g)


def greedy(iova: int, paddr: int, size: int, sizes: list[int]) -> list[tuple[int, int, int]]:
    """Largest leaf that fits the remaining length and both addresses' alignment, repeatedly."""
    out = []
    while size:
        leaf = next(s for s in sorted(sizes, reverse=True) if s <= size and not (iova | paddr) % s)
        out.append((iova, leaf, paddr))
        iova, paddr, size = iova + leaf, paddr + leaf, size - leaf
    return out


@given(
    iova_pages=st.integers(0, (16 * GiB) >> 12),
    delta=st.sampled_from([0, 4 * KiB, 2 * MiB, 6 * MiB, GiB, 3 * GiB]),
    size_pages=st.integers(1, (96 * MiB) >> 12),
    stage=st.sampled_from([1, 2]),
)
@example(iova_pages=(GiB >> 12) - 1, delta=0, size_pages=(GiB + 2 * MiB + 8 * KiB) >> 12, stage=2)
@example(iova_pages=(2 * GiB - 2 * MiB) >> 12, delta=GiB, size_pages=(GiB + 4 * MiB) >> 12, stage=1)
def test_map_decomposes_into_largest_leaves(make_rig, iova_pages, delta, size_pages, stage) -> None:
    rig = make_rig(PageTableConfig(stage=stage, granule=GRANULE_4K, ias=48, oas=48), 64)
    iova, size = iova_pages << 12, size_pages << 12
    paddr = iova + delta
    assert rig.table.map(iova, paddr, size, RW) == (size, 0)
    # RW, non-cacheable leaves by hand: S1 AP=01 AttrIndx=0 SH=OS AF nG; S2 S2AP=11 MemAttr=0101 SH=OS AF
    attrs = (
        (1 << 6) | (2 << 8) | (1 << 10) | (1 << 11)
        if stage == 1
        else (3 << 6) | (5 << 2) | (2 << 8) | (1 << 10)
    )
    expected = [
        (va, leaf, pa | attrs | (0b11 if leaf == 4 * KiB else 0b01))
        for va, leaf, pa in greedy(iova, paddr, size, [4 * KiB, 2 * MiB, GiB])
    ]
    assert [(leaf.iova, leaf.size, leaf.desc) for leaf in rig.table.walk_leaves()] == expected
    assert expand_runs(rig.table) == expected


def expand_runs(table) -> list[tuple[int, int, int]]:
    """walk_runs() spelled out leaf by leaf."""
    return [
        (run.iova + k * run.pgsize, run.pgsize, run.desc + k * run.pgsize)
        for run in table.walk_runs()
        for k in range(run.entries)
    ]


OPS = st.lists(
    st.tuples(st.booleans(), st.integers(0, 1535), st.integers(1, 700), st.integers(0, 3)),
    min_size=1,
    max_size=25,
)


@given(ops=OPS)
def test_random_map_unmap_against_a_page_dict(make_rig, ops) -> None:
    """Page-only 4K table over three leaf tables; a map writes one leaf table's worth at a time
    and refuses a whole chunk if any page in it is taken, as the bulk path does."""
    rig = make_rig(PageTableConfig(stage=2, granule=GRANULE_4K, ias=40, oas=40, pgsize_bitmap=4 * KiB), 64)
    table = rig.table
    model: dict[int, int] = {}
    for is_map, page, count, pa_shift in ops:
        count = min(count, 1536 - page)
        if is_map:
            expected_mapped, expected_error = 0, 0
            p = page
            while p < page + count:
                chunk = range(p, min(page + count, (p // 512 + 1) * 512))
                if any(q in model for q in chunk):
                    expected_error = -errno.EEXIST
                    break
                for q in chunk:
                    model[q] = q + pa_shift * 1000
                expected_mapped += len(chunk) * 4 * KiB
                p = chunk.stop
            result = table.map(page << 12, (page + pa_shift * 1000) << 12, count << 12, RW)
            assert result == (expected_mapped, expected_error)
        else:
            run = 0
            while page + run < page + count and page + run in model:
                del model[page + run]
                run += 1
            assert table.unmap(page << 12, count << 12) == run << 12
    assert {leaf.iova >> 12: leaf.desc & 0xFF_FFFF_F000 for leaf in table.walk_leaves()} == {
        q: pa << 12 for q, pa in model.items()
    }
    assert expand_runs(table) == [(leaf.iova, leaf.size, leaf.desc) for leaf in table.walk_leaves()]
