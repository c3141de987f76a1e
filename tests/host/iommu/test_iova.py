"""The IOVA allocator: top-down below the limit, size alignment, exhaustion, reservations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm_smmu.host.iommu import Iova, IovaDomain


def test_allocates_top_down_below_an_inclusive_limit() -> None:
    iovad = IovaDomain(4096)
    assert iovad.alloc_iova(1, 0xFFFFF) == Iova(0xFFFFF, 0xFFFFF)
    assert iovad.alloc_iova(1, 0xFFFFF) == Iova(0xFFFFE, 0xFFFFE)
    assert iovad.alloc_iova(2, 0xFFFFF) == Iova(0xFFFFC, 0xFFFFD)


def test_size_alignment_rounds_to_the_next_power_of_two() -> None:
    for aligned, expected in ((True, Iova(0xF8, 0xFA)), (False, Iova(0xF9, 0xFB))):
        iovad = IovaDomain(4096)
        assert iovad.alloc_iova(1, 0xFF) == Iova(0xFF, 0xFF)
        assert iovad.alloc_iova(3, 0xFF) == Iova(0xFC, 0xFE)
        # the hole below 0xFC: aligned to 4 leaves 0xFB unused
        assert iovad.alloc_iova(3, 0xFF, size_aligned=aligned) == expected
    assert iovad.alloc_iova(5, 0xFF) == Iova(0xF0, 0xF4)  # 5 pages aligned to 8


def test_exhaustion_free_and_reuse() -> None:
    iovad = IovaDomain(4096, start_pfn=1)
    got = [iovad.alloc_iova(1, 3) for _ in range(4)]
    assert got == [Iova(3, 3), Iova(2, 2), Iova(1, 1), None]  # pfn 0 is never used
    assert iovad.free_iova(2)
    assert not iovad.free_iova(2)  # double free
    assert iovad.alloc_iova(1, 3) == Iova(2, 2)
    assert iovad.alloc_iova(1, 0) is None


def test_holes_between_allocations_are_found() -> None:
    iovad = IovaDomain(4096)
    blocks = [iovad.alloc_iova(4, 0x3F) for _ in range(4)]
    assert [b.pfn_lo for b in blocks if b] == [0x3C, 0x38, 0x34, 0x30]
    assert iovad.free_iova(0x39)  # any pfn inside the range frees it
    assert iovad.alloc_iova(2, 0x3F) == Iova(0x3A, 0x3B)
    assert iovad.alloc_iova(4, 0x3F) == Iova(0x2C, 0x2F)


def test_reservations_merge_are_skipped_and_cannot_be_freed() -> None:
    iovad = IovaDomain(4096)
    assert iovad.reserve_iova(0x80, 0x8F)
    assert iovad.reserve_iova(0x88, 0x9F)
    assert iovad.reserved == [Iova(0x80, 0x9F)]
    assert iovad.alloc_iova(0x10, 0x9F) == Iova(0x70, 0x7F)
    assert not iovad.free_iova(0x85)
    assert not iovad.reserve_iova(0x70, 0x70)  # overlaps an allocation


def test_granule_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="granule"):
        IovaDomain(3000)
    iovad = IovaDomain(16384)
    assert (iovad.shift, iovad.iova_offset(0x4321), iovad.iova_align(1)) == (14, 0x321, 16384)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("alloc"), st.integers(1, 40), st.integers(0, 255)),
            st.tuples(st.just("free"), st.integers(0, 50), st.just(0)),
        ),
        max_size=60,
    )
)
def test_random_allocations_never_overlap_and_respect_limit_and_alignment(
    ops: list[tuple[str, int, int]],
) -> None:
    iovad = IovaDomain(4096, start_pfn=1)
    live: list[Iova] = []
    for op, a, b in ops:
        if op == "alloc":
            iova = iovad.alloc_iova(a, b)
            if iova is None:
                align = 1 << (a - 1).bit_length()
                # no aligned hole of that size exists below the limit
                for lo in range(0, b + 1, align):
                    if lo >= 1 and lo + a - 1 <= b:
                        assert any(lo <= x.pfn_hi and x.pfn_lo <= lo + a - 1 for x in live)
                continue
            assert iova.size == a and iova.pfn_lo >= 1 and iova.pfn_hi <= b
            assert iova.pfn_lo % (1 << (a - 1).bit_length()) == 0
            assert all(iova.pfn_hi < x.pfn_lo or x.pfn_hi < iova.pfn_lo for x in live)
            # top-down: no aligned slot above it was free
            align = 1 << (a - 1).bit_length()
            higher = iova.pfn_lo + align
            if higher + a - 1 <= b:
                assert any(higher <= x.pfn_hi and x.pfn_lo <= higher + a - 1 for x in live)
            live.append(iova)
        elif live:
            victim = live.pop(a % len(live))
            assert iovad.free_iova(victim.pfn_lo)
    assert sorted(live) == iovad.allocated
