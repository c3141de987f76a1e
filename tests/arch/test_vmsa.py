"""VMSAv8-64 encodings and geometry against hand-computed values from the Arm ARM bit positions."""

import pytest

from pkvm_smmu.arch.vmsa import (
    GRANULE_4K,
    GRANULE_16K,
    GRANULE_64K,
    GRANULES,
    S1_LEAF,
    S2_LEAF,
    TABLE_DESC,
    DescKind,
    S1Ap,
    S2Ap,
    S2MemAttr,
    Shareability,
    classify,
    contig_entries,
    desc_output_address,
    desc_table_address,
    granule_from_size,
    granule_from_tg0,
    granule_from_tg1,
    make_desc_output_address,
    pa_bits_from_ps,
    ps_encoding,
    tg0_encoding,
    tg1_encoding,
)

GiB = 1 << 30
MiB = 1 << 20

# -- descriptor layouts -------------------------------------------------------------------------


def test_table_desc_fields_by_hand() -> None:
    # table at 0x8_1234_5000, APTable=0b10 (bit 62), NSTable (63), PXNTable (59)
    desc = (1 << 63) | (1 << 62) | (1 << 59) | 0x0000_0008_1234_5000 | 0b11
    assert (
        TABLE_DESC.encode(VALID=1, TYPE=1, NLTA=0x8_1234_5000 >> 12, APTABLE=2, NSTABLE=1, PXNTABLE=1) == desc
    )
    fields = TABLE_DESC.decode(desc)
    assert fields["NLTA"] == 0x812345
    assert TABLE_DESC.NLTA.get_address(desc) == 0x8_1234_5000
    assert fields["APTABLE"] == 2 and fields["XNTABLE"] == 0
    assert TABLE_DESC.XNTABLE.in_place_mask == 1 << 60


def test_s1_leaf_fields_by_hand() -> None:
    # page at 0x4000_2000: valid page, AttrIndx=1, AP=RO (0b11), SH=IS, AF, nG, PXN, UXN
    desc = (
        0x4000_2000
        | 0b11
        | (1 << 2)
        | (0b11 << 6)
        | (0b11 << 8)
        | (1 << 10)
        | (1 << 11)
        | (1 << 53)
        | (1 << 54)
    )
    fields = S1_LEAF.decode(desc)
    assert fields["ATTRINDX"] == 1
    assert fields["AP"] == S1Ap.RO
    assert fields["SH"] == Shareability.ISH
    assert fields["AF"] == 1 and fields["NG"] == 1
    assert fields["PXN"] == 1 and fields["UXN"] == 1
    assert fields["NS"] == 0 and fields["DBM"] == 0 and fields["CONTIG"] == 0
    assert S1_LEAF.OA.get_address(desc) == 0x4000_2000
    assert S1_LEAF.field("DBM").lo == 51 and S1_LEAF.field("CONTIG").lo == 52
    assert S1_LEAF.field("SW").hi == 58 and S1_LEAF.field("SW").lo == 55
    assert S1_LEAF.field("PBHA").hi == 62 and S1_LEAF.field("PBHA").lo == 59
    assert S1_LEAF.NT.in_place_mask == 1 << 16


def test_s2_leaf_fields_by_hand() -> None:
    # 2 MiB block at 0x8020_0000: MemAttr=0xF, S2AP=RW, SH=IS, AF, XN=0b11
    desc = 0x8020_0000 | 0b01 | (0xF << 2) | (0b11 << 6) | (0b11 << 8) | (1 << 10) | (0b11 << 53)
    fields = S2_LEAF.decode(desc)
    assert fields["MEMATTR"] == S2MemAttr.NORMAL_WB
    assert fields["S2AP"] == S2Ap.RW
    assert fields["XN"] == 3
    assert fields["TYPE"] == 0 and fields["VALID"] == 1
    assert S2_LEAF.encode(S2AP=S2Ap.RO) == 1 << 6
    assert S2_LEAF.encode(S2AP=S2Ap.WO) == 1 << 7
    assert S2_LEAF.encode(MEMATTR=S2MemAttr.DEVICE_nGnRE) == 1 << 2
    assert S2_LEAF.encode(MEMATTR=S2MemAttr.NORMAL_NC) == 0b0101 << 2


def test_pretty_names_fields() -> None:
    text = S2_LEAF.pretty(0x8020_0000 | 0b01 | (0b11 << 6) | (1 << 10))
    assert "S2AP=RW" in text and "AF=1" in text


# -- output addresses ---------------------------------------------------------------------------


def test_block_output_address_drops_bits_below_block() -> None:
    # 4K L2 block: OA is bits [47:21]; bit 16 (nT) and bits [20:12] are not address bits
    desc = 0x0000_1234_5660_0000 | (1 << 16) | (1 << 12) | 0b01
    assert desc_output_address(desc, GRANULE_4K, 2) == 0x0000_1234_5660_0000
    assert desc_output_address(desc, GRANULE_4K, 3) == 0x0000_1234_5661_1000
    # 4K L1 block: bits [47:30]
    assert desc_output_address(0x0000_00C0_7FE0_0001, GRANULE_4K, 1) == 0x0000_00C0_4000_0000


def test_oa52_with_64k_granule() -> None:
    # OA 0xA_0001_2345_0000: bits [51:48]=0xA go to descriptor bits [15:12]
    oa = 0x000A_0001_2345_0000
    bits = make_desc_output_address(oa, GRANULE_64K, 3, oa52=True)
    assert bits == 0x0000_0001_2345_0000 | (0xA << 12)
    assert desc_output_address(bits | 0b11, GRANULE_64K, 3, oa52=True) == oa
    # without oa52 the bits [15:12] are not address bits
    assert desc_output_address(bits | 0b11, GRANULE_64K, 3) == 0x0000_0001_2345_0000
    assert make_desc_output_address(0x1234_5000, GRANULE_4K, 3) == 0x1234_5000


def test_table_address() -> None:
    assert desc_table_address(0x0000_0000_4567_8003 | (1 << 63), GRANULE_4K) == 0x4567_8000
    # 16K: bits [13:12] below the granule are not address bits
    assert desc_table_address(0x0000_0000_4567_B003, GRANULE_16K) == 0x4567_8000


def test_classify() -> None:
    assert classify(0, GRANULE_4K, 1) is DescKind.INVALID
    assert classify(0b10, GRANULE_4K, 1) is DescKind.INVALID
    assert classify(0b11, GRANULE_4K, 0) is DescKind.TABLE
    assert classify(0b11, GRANULE_4K, 3) is DescKind.PAGE
    assert classify(0b01, GRANULE_4K, 1) is DescKind.BLOCK
    assert classify(0b01, GRANULE_4K, 0) is DescKind.RESERVED  # no L0 blocks
    assert classify(0b01, GRANULE_4K, 3) is DescKind.RESERVED  # 01 at L3 reserved
    assert classify(0b01, GRANULE_16K, 1) is DescKind.RESERVED
    assert classify(0b01, GRANULE_64K, 1) is DescKind.RESERVED
    assert classify(0b01, GRANULE_64K, 1, oa52=True) is DescKind.BLOCK


# -- granule geometry ---------------------------------------------------------------------------


def test_granule_basics() -> None:
    assert (GRANULE_4K.shift, GRANULE_16K.shift, GRANULE_64K.shift) == (12, 14, 16)
    assert (GRANULE_4K.size, GRANULE_16K.size, GRANULE_64K.size) == (4096, 16384, 65536)
    assert (GRANULE_4K.bits_per_level, GRANULE_16K.bits_per_level, GRANULE_64K.bits_per_level) == (9, 11, 13)
    entries = (GRANULE_4K.table_entries, GRANULE_16K.table_entries, GRANULE_64K.table_entries)
    assert entries == (512, 2048, 8192)
    assert GRANULES[16384] is GRANULE_16K
    assert granule_from_size(65536) is GRANULE_64K
    assert granule_from_size(8192) is None


@pytest.mark.parametrize(
    ("granule", "shifts"),
    [
        (GRANULE_4K, {0: 39, 1: 30, 2: 21, 3: 12}),
        (GRANULE_16K, {0: 47, 1: 36, 2: 25, 3: 14}),
        (GRANULE_64K, {1: 42, 2: 29, 3: 16}),
    ],
)
def test_level_shifts(granule, shifts) -> None:
    for level, shift in shifts.items():
        assert granule.level_shift(level) == shift
        assert granule.block_size(level) == 1 << shift


def test_block_sizes() -> None:
    assert GRANULE_4K.block_size(1) == GiB
    assert GRANULE_4K.block_size(2) == 2 * MiB
    assert GRANULE_16K.block_size(2) == 32 * MiB
    assert GRANULE_64K.block_size(2) == 512 * MiB
    assert GRANULE_64K.block_size(1) == 4 << 40


def test_index() -> None:
    addr = (5 << 39) | (7 << 30) | (9 << 21) | (11 << 12) | 0x123
    assert [GRANULE_4K.index(addr, lvl) for lvl in range(4)] == [5, 7, 9, 11]
    # 64K: L2 bits [41:29], L3 bits [28:16]
    addr = (0x1ABC << 29) | (0x0DEF << 16)
    assert GRANULE_64K.index(addr, 2) == 0x1ABC
    assert GRANULE_64K.index(addr, 3) == 0x0DEF


def test_leaf_levels() -> None:
    assert GRANULE_4K.leaf_levels(48) == (1, 2, 3)
    assert GRANULE_16K.leaf_levels(48) == (2, 3)
    assert GRANULE_64K.leaf_levels(48) == (2, 3)
    assert GRANULE_64K.leaf_levels(52) == (1, 2, 3)
    assert GRANULE_4K.leaf_sizes() == (GiB, 2 * MiB, 4096)


@pytest.mark.parametrize(
    ("granule", "ia_bits", "level", "index_bits"),
    [
        (GRANULE_4K, 48, 0, 9),
        (GRANULE_4K, 39, 1, 9),
        (GRANULE_4K, 40, 0, 1),
        (GRANULE_4K, 32, 1, 2),
        (GRANULE_4K, 30, 2, 9),
        (GRANULE_64K, 48, 1, 6),
        (GRANULE_64K, 42, 2, 13),
        (GRANULE_64K, 36, 2, 7),
        (GRANULE_16K, 47, 1, 11),
        (GRANULE_16K, 48, 0, 1),
        (GRANULE_16K, 36, 2, 11),
        (GRANULE_16K, 32, 2, 7),
    ],
)
def test_s1_start_level(granule, ia_bits, level, index_bits) -> None:
    assert granule.s1_start_level(ia_bits) == level
    assert granule.start_level_index_bits(ia_bits, level) == index_bits


def test_s1_start_level_out_of_range() -> None:
    assert GRANULE_4K.s1_start_level(12) is None
    assert GRANULE_4K.s1_start_level(52) is None  # would need level -1 (LPA2)


def test_s2_sl0() -> None:
    assert [GRANULE_4K.s2_start_level(sl0) for sl0 in range(4)] == [2, 1, 0, None]
    for granule in (GRANULE_16K, GRANULE_64K):
        assert [granule.s2_start_level(sl0) for sl0 in range(4)] == [3, 2, 1, None]
        assert granule.s2_sl0(0) is None
        assert granule.s2_sl0(1) == 2
    assert GRANULE_4K.s2_sl0(0) == 2
    assert GRANULE_4K.s2_sl0(2) == 0
    assert GRANULE_4K.s2_sl0(3) is None


@pytest.mark.parametrize(
    ("granule", "ia_bits", "start", "tables"),
    [
        (GRANULE_4K, 40, 1, 2),  # L1 resolves [38:30], bit 39 selects one of 2 tables
        (GRANULE_4K, 39, 1, 1),
        (GRANULE_4K, 43, 1, 16),
        (GRANULE_4K, 44, 1, None),  # 32 tables
        (GRANULE_4K, 48, 1, None),  # 512
        (GRANULE_4K, 48, 0, 1),
        (GRANULE_4K, 32, 2, 4),
        (GRANULE_4K, 30, 1, None),  # L1 cannot resolve any bit of a 30-bit input
        (GRANULE_4K, 31, 1, 1),
        (GRANULE_16K, 48, 1, 2),
        (GRANULE_16K, 40, 2, 16),
        (GRANULE_64K, 48, 1, 1),
        (GRANULE_64K, 46, 2, 16),
        (GRANULE_64K, 47, 2, None),
        (GRANULE_64K, 42, 3, None),  # 64 tables
    ],
)
def test_s2_concatenation(granule, ia_bits, start, tables) -> None:
    assert granule.s2_concatenated_tables(ia_bits, start) == tables


def test_tg_encodings() -> None:
    assert [tg0_encoding(g) for g in (GRANULE_4K, GRANULE_64K, GRANULE_16K)] == [0, 1, 2]
    assert [tg1_encoding(g) for g in (GRANULE_16K, GRANULE_4K, GRANULE_64K)] == [1, 2, 3]
    assert granule_from_tg0(0) is GRANULE_4K
    assert granule_from_tg0(1) is GRANULE_64K
    assert granule_from_tg0(2) is GRANULE_16K
    assert granule_from_tg0(3) is None
    assert granule_from_tg1(0) is None
    assert granule_from_tg1(1) is GRANULE_16K
    assert granule_from_tg1(2) is GRANULE_4K
    assert granule_from_tg1(3) is GRANULE_64K


def test_ps_encoding() -> None:
    assert [ps_encoding(b) for b in (32, 36, 40, 42, 44, 48, 52)] == [0, 1, 2, 3, 4, 5, 6]
    assert ps_encoding(39) is None
    assert pa_bits_from_ps(5) == 48
    assert pa_bits_from_ps(7) is None


def test_contig_entries() -> None:
    assert [contig_entries(GRANULE_4K, lvl) for lvl in range(4)] == [None, 16, 16, 16]
    assert [contig_entries(GRANULE_16K, lvl) for lvl in range(4)] == [None, None, 32, 128]
    assert [contig_entries(GRANULE_64K, lvl) for lvl in range(4)] == [None, None, 32, 32]
    # group spans from the reference card: 4K L3 64 KiB, 16K L3 2 MiB, 64K L2 16 GiB
    assert 16 * GRANULE_4K.block_size(3) == 64 * 1024
    assert 128 * GRANULE_16K.block_size(3) == 2 * MiB
    assert 32 * GRANULE_64K.block_size(2) == 16 * GiB
