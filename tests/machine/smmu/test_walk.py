"""The VMSAv8-64 walker against tables built by hand from the Arm ARM descriptor layouts.

Tables are written word by word into a Ram (not with the project's pgtable library), at addresses
chosen so that every descriptor address and output address below can be checked against a
literal computed by hand from the level index bit ranges (4K: L0 [47:39], L1 [38:30], L2 [29:21],
L3 [20:12]; 16K: L1 [46:36], L2 [35:25], L3 [24:14]; 64K: L1 [47:42], L2 [41:29], L3 [28:16]).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pkvm_smmu.arch.events import EventType, FaultClass
from pkvm_smmu.arch.vmsa import GRANULE_4K, GRANULE_16K, GRANULE_64K, S1_LEAF, S2_LEAF, TABLE_DESC, Granule
from pkvm_smmu.machine.bus import ExternalAbort
from pkvm_smmu.machine.memory import Ram
from pkvm_smmu.machine.smmu.types import WalkConfig, WalkFault, WalkLeaf
from pkvm_smmu.machine.smmu.walk import check_permission, walk

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class Memory:
    """Descriptors in a Ram; records every read; chosen addresses abort."""

    def __init__(self) -> None:
        self.ram = Ram()
        self.reads: list[int] = []
        self.aborting: set[int] = set()

    def put(self, pa: int, desc: int) -> None:
        self.ram.write_int(pa, 8, desc)

    def read(self, pa: int) -> int | ExternalAbort:
        self.reads.append(pa)
        if pa in self.aborting:
            return ExternalAbort(pa, "test abort")
        return self.ram.read_int(pa, 8)


def table(next_table: int, **attrs: int) -> int:
    return TABLE_DESC.encode(VALID=1, TYPE=1, **attrs) | TABLE_DESC.NLTA.insert_address(next_table)


def s1_leaf(oa: int, *, page: bool, af: int = 1, **attrs: int) -> int:
    """A stage-1 page (bits[1:0] = 11) or block (01); ``oa`` aligned, placed in bits [47:12]."""
    assert oa < 1 << 48
    return S1_LEAF.encode(VALID=1, TYPE=int(page), AF=af, **attrs) | oa


def s2_leaf(oa: int, *, page: bool, af: int = 1, **attrs: int) -> int:
    assert oa < 1 << 48
    return S2_LEAF.encode(VALID=1, TYPE=int(page), AF=af, **attrs) | oa


def s1_cfg(granule: Granule = GRANULE_4K, ttb: int = 0x10000, start_level: int = 0, **kw: Any) -> WalkConfig:
    fields = {"input_bits": 48, "output_bits": 48} | kw
    return WalkConfig(stage=1, granule=granule, ttb=ttb, start_level=start_level, concatenated=1, **fields)


def geometry(leaf: WalkLeaf) -> tuple[int, int, int, int]:
    return leaf.level, leaf.size, leaf.input_base, leaf.output_base


# -- 4 KiB, stage 1, four levels ------------------------------------------------------------------
# VA with L0 index 1, L1 index 2, L2 index 3, L3 index 4, page offset 0x567.
VA = (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12) | 0x567
assert VA == 0x0000_0080_8060_4567
L0, L1, L2, L3 = 0x10000, 0x11000, 0x12000, 0x13000
D0, D1, D2, D3 = 0x10008, 0x11010, 0x12018, 0x13020  # table + 8 * index


def four_level(mem: Memory, leaf: int, **table_attrs: dict[str, int]) -> None:
    mem.put(D0, table(L1, **table_attrs.get("l0", {})))
    mem.put(D1, table(L2, **table_attrs.get("l1", {})))
    mem.put(D2, table(L3, **table_attrs.get("l2", {})))
    mem.put(D3, leaf)


def test_4k_page_walk_reads_one_descriptor_per_level() -> None:
    mem = Memory()
    four_level(mem, s1_leaf(0x4_0000_0000, page=True, ATTRINDX=3))
    leaf = walk(s1_cfg(), VA, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert mem.reads == [D0, D1, D2, D3]
    assert leaf.path == (D0, D1, D2, D3)
    assert leaf.descriptor_address == D3
    assert leaf.descriptor == mem.ram.read_int(D3, 8)
    assert (leaf.level, leaf.size) == (3, 4 * KiB)
    assert leaf.input_base == 0x0000_0080_8060_4000
    assert leaf.output_base == 0x4_0000_0000
    assert leaf.attr == 3
    assert leaf.global_entry


def test_4k_2m_block_at_level_2() -> None:
    mem = Memory()
    mem.put(D0, table(L1))
    mem.put(D1, table(L2))
    mem.put(D2, s1_leaf(0x8000_0000, page=False, NG=1))
    leaf = walk(s1_cfg(), VA, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert leaf.path == (D0, D1, D2)
    assert (leaf.level, leaf.size) == (2, 2 * MiB)
    assert leaf.input_base == 0x0000_0080_8060_0000
    assert leaf.output_base == 0x8000_0000
    assert not leaf.global_entry


def test_4k_1g_block_at_level_1_ignores_oa_bits_below_the_block() -> None:
    mem = Memory()
    mem.put(D0, table(L1))
    # OA bits [29:12] of a 1 GiB block are RES0: the walker must not add them to the output.
    mem.put(D1, s1_leaf(0x1_4000_0000 | 0x1234_5000, page=False))
    leaf = walk(s1_cfg(), VA, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert (leaf.level, leaf.size) == (1, GiB)
    assert leaf.input_base == 0x0000_0080_8000_0000
    assert leaf.output_base == 0x1_4000_0000


def test_4k_start_at_level_1_for_39_bit_input() -> None:
    mem = Memory()
    va = (2 << 30) | (3 << 21) | (4 << 12)  # 39-bit input: start table is the L1 table
    mem.put(L1 + 0x10, table(L2))
    mem.put(L2 + 0x18, table(L3))
    mem.put(L3 + 0x20, s1_leaf(0x5000, page=True))
    leaf = walk(s1_cfg(ttb=L1, start_level=1, input_bits=39), va, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert leaf.path == (L1 + 0x10, L2 + 0x18, L3 + 0x20)
    assert leaf.output_base == 0x5000


# -- 16 KiB and 64 KiB ------------------------------------------------------------------------------
def test_16k_page_and_32m_block() -> None:
    va = (5 << 36) | (6 << 25) | (7 << 14) | 0x123
    assert va == 0x0000_0050_0C01_C123
    t1, t2, t3 = 0x40000, 0x44000, 0x48000
    mem = Memory()
    mem.put(t1 + 5 * 8, table(t2))
    mem.put(t2 + 6 * 8, table(t3))
    mem.put(t3 + 7 * 8, s1_leaf(0x1234_4000, page=True))
    cfg = s1_cfg(GRANULE_16K, ttb=t1, start_level=1, input_bits=47)
    leaf = walk(cfg, va, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert leaf.path == (0x40028, 0x44030, 0x48038)
    assert geometry(leaf) == (3, 16 * KiB, 0x50_0C01_C000, 0x1234_4000)

    mem.put(t2 + 6 * 8, s1_leaf(0x2_0000_0000, page=False))
    leaf = walk(cfg, va, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert geometry(leaf) == (2, 32 * MiB, 0x50_0C00_0000, 0x2_0000_0000)


def test_16k_block_at_level_1_is_a_translation_fault() -> None:
    mem = Memory()
    mem.put(0x40000 + 5 * 8, s1_leaf(0x10_0000_0000, page=False))
    fault = walk(s1_cfg(GRANULE_16K, ttb=0x40000, start_level=1, input_bits=47), 5 << 36, mem.read)
    assert fault == WalkFault(EventType.F_TRANSLATION, 1, 1, FaultClass.IN)


VA64 = (3 << 42) | (5 << 29) | (9 << 16) | 0xABC
T64 = (0x100000, 0x110000, 0x120000)


def test_64k_page_and_512m_block() -> None:
    assert VA64 == 0x0000_0C00_A009_0ABC
    mem = Memory()
    mem.put(T64[0] + 3 * 8, table(T64[1]))
    mem.put(T64[1] + 5 * 8, table(T64[2]))
    mem.put(T64[2] + 9 * 8, s1_leaf(0x7_1234_0000, page=True))
    cfg = s1_cfg(GRANULE_64K, ttb=T64[0], start_level=1)
    leaf = walk(cfg, VA64, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert leaf.path == (0x100018, 0x110028, 0x120048)
    assert geometry(leaf) == (3, 64 * KiB, 0xC00_A009_0000, 0x7_1234_0000)

    mem.put(T64[1] + 5 * 8, s1_leaf(0x6000_0000, page=False))
    leaf = walk(cfg, VA64, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert geometry(leaf) == (2, 512 * MiB, 0xC00_A000_0000, 0x6000_0000)


def test_64k_level_1_block_needs_a_52_bit_output() -> None:
    mem = Memory()
    # A 4 TiB block at OA 2**49: OA[51:48] = 0b0010 lives in descriptor bits [15:12].
    mem.put(T64[0] + 3 * 8, S1_LEAF.encode(VALID=1, AF=1, OA_HI=0b0010))
    cfg48 = s1_cfg(GRANULE_64K, ttb=T64[0], start_level=1)
    assert walk(cfg48, VA64, mem.read) == WalkFault(EventType.F_TRANSLATION, 1, 1, FaultClass.IN)
    leaf = walk(dataclasses.replace(cfg48, output_bits=52), VA64, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert geometry(leaf) == (1, 4 << 40, 0xC00_0000_0000, 1 << 49)


def test_64k_52_bit_next_table_address_uses_bits_15_12() -> None:
    mem = Memory()
    # The level-2 table sits at PA 2**48 + 0x110000: NLTA[51:48] = 0b0001 in bits [15:12].
    mem.put(T64[0] + 3 * 8, table(0x110000) | (1 << 12))
    mem.put((1 << 48) + 0x110000 + 5 * 8, s1_leaf(0x6000_0000, page=False))
    leaf = walk(s1_cfg(GRANULE_64K, ttb=T64[0], start_level=1, output_bits=52), VA64, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert leaf.path == (0x100018, (1 << 48) + 0x110028)


# -- stage 2 --------------------------------------------------------------------------------------
S2_TTB = 0x200000  # two concatenated 4 KiB level-1 tables: 8 KiB, 8 KiB aligned
IPA = (1 << 39) | (1 << 30) | (2 << 21) | (3 << 12) | 0x10


def s2_cfg(**kw: Any) -> WalkConfig:
    fields: dict[str, Any] = {
        "stage": 2, "granule": GRANULE_4K, "ttb": S2_TTB, "start_level": 1, "concatenated": 2,
        "input_bits": 40, "output_bits": 48,
    } | kw  # fmt: skip
    return WalkConfig(**fields)


def s2_tables(mem: Memory, leaf: int) -> None:
    # Start index = IPA[39:30] = 0b10_0000_0001 = 513: entry 1 of the second concatenated table.
    mem.put(S2_TTB + 0x1008, table(0x210000))
    mem.put(0x210000 + 2 * 8, table(0x211000))
    mem.put(0x211000 + 3 * 8, leaf)


def test_stage2_with_two_concatenated_start_tables() -> None:
    mem = Memory()
    s2_tables(mem, s2_leaf(0x9000_0000, page=True, S2AP=0b01, MEMATTR=0xF))
    leaf = walk(s2_cfg(), IPA, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert leaf.path == (0x201008, 0x210010, 0x211018)
    assert geometry(leaf) == (3, 4 * KiB, IPA - 0x10, 0x9000_0000)
    assert (leaf.readable, leaf.writable, leaf.executable, leaf.priv_executable) == (True, False, True, True)
    assert leaf.unpriv
    assert leaf.attr == 0xF


def test_stage2_start_table_base_low_bits_are_treated_as_zero() -> None:
    mem = Memory()
    s2_tables(mem, s2_leaf(0x9000_0000, page=True, S2AP=0b11))
    leaf = walk(s2_cfg(ttb=S2_TTB + 0x1000), IPA, mem.read)  # not 8 KiB aligned
    assert isinstance(leaf, WalkLeaf)
    assert leaf.path[0] == 0x201008


@pytest.mark.parametrize(("xn", "executable"), [(0b00, True), (0b01, True), (0b10, False), (0b11, False)])
def test_stage2_xn_bit_54_forbids_execution_and_bit_53_is_ignored(xn: int, executable: bool) -> None:
    mem = Memory()
    s2_tables(mem, s2_leaf(0x9000_0000, page=True, S2AP=0b11, XN=xn))
    leaf = walk(s2_cfg(), IPA, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert (leaf.executable, leaf.priv_executable) == (executable, executable)


def test_stage2_faults_report_the_ipa_and_stage() -> None:
    mem = Memory()
    s2_tables(mem, 0)  # invalid level-3 descriptor
    assert walk(s2_cfg(), IPA, mem.read) == WalkFault(EventType.F_TRANSLATION, 2, 3, FaultClass.IN, ipa=IPA)
    s2_tables(mem, s2_leaf(0x9000_0000, page=True, af=0))
    assert walk(s2_cfg(), IPA, mem.read) == WalkFault(EventType.F_ACCESS, 2, 3, FaultClass.IN, ipa=IPA)
    assert walk(s2_cfg(), 1 << 40, mem.read) == WalkFault(
        EventType.F_TRANSLATION, 2, 1, FaultClass.IN, ipa=1 << 40
    )
    mem.aborting.add(0x210010)
    assert walk(s2_cfg(), IPA, mem.read) == WalkFault(
        EventType.F_WALK_EABT, 2, 2, FaultClass.IN, ipa=IPA, fetch_address=0x210010
    )


def test_stage2_block_at_level_0_of_a_4k_walk_is_a_translation_fault() -> None:
    mem = Memory()
    mem.put(0x300000 + 8, s2_leaf(0x80_0000_0000, page=False))
    cfg = s2_cfg(ttb=0x300000, start_level=0, concatenated=1, input_bits=48)
    assert walk(cfg, 1 << 39, mem.read) == WalkFault(
        EventType.F_TRANSLATION, 2, 0, FaultClass.IN, ipa=1 << 39
    )


# -- faults, stage 1 --------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_invalid_descriptor_at_each_level(level: int) -> None:
    mem = Memory()
    four_level(mem, s1_leaf(0x4_0000_0000, page=True))
    invalid = [D0, D1, D2, D3][level]
    mem.put(invalid, mem.ram.read_int(invalid, 8) & ~1)  # bit 0 clear: invalid, whatever else is set
    assert walk(s1_cfg(), VA, mem.read) == WalkFault(EventType.F_TRANSLATION, 1, level, FaultClass.IN)
    assert mem.reads == [D0, D1, D2, D3][: level + 1]


def test_4k_block_at_level_0_is_a_translation_fault() -> None:
    mem = Memory()
    mem.put(D0, s1_leaf(0x80_0000_0000, page=False))
    assert walk(s1_cfg(), VA, mem.read) == WalkFault(EventType.F_TRANSLATION, 1, 0, FaultClass.IN)


def test_block_encoding_at_level_3_is_a_translation_fault() -> None:
    mem = Memory()
    four_level(mem, s1_leaf(0x4_0000_0000, page=False))  # bits[1:0] = 0b01 at level 3: reserved
    assert walk(s1_cfg(), VA, mem.read) == WalkFault(EventType.F_TRANSLATION, 1, 3, FaultClass.IN)


def test_output_address_above_output_size_is_an_address_size_fault() -> None:
    mem = Memory()
    four_level(mem, s1_leaf(1 << 40, page=True))
    assert walk(s1_cfg(output_bits=40), VA, mem.read) == WalkFault(EventType.F_ADDR_SIZE, 1, 3, FaultClass.IN)
    assert isinstance(walk(s1_cfg(output_bits=41), VA, mem.read), WalkLeaf)


def test_next_table_address_above_output_size_is_an_address_size_fault_at_that_level() -> None:
    mem = Memory()
    four_level(mem, s1_leaf(0x4000, page=True))
    mem.put(D1, table(1 << 41))
    assert walk(s1_cfg(output_bits=40), VA, mem.read) == WalkFault(EventType.F_ADDR_SIZE, 1, 1, FaultClass.IN)
    assert mem.reads == [D0, D1]  # the out-of-range table is never read


def test_address_size_fault_comes_before_access_flag_fault() -> None:
    mem = Memory()
    four_level(mem, s1_leaf(1 << 40, page=True, af=0))
    assert walk(s1_cfg(output_bits=40), VA, mem.read) == WalkFault(EventType.F_ADDR_SIZE, 1, 3, FaultClass.IN)


def test_access_flag_fault_unless_affd() -> None:
    mem = Memory()
    four_level(mem, s1_leaf(0x4_0000_0000, page=True, af=0))
    assert walk(s1_cfg(), VA, mem.read) == WalkFault(EventType.F_ACCESS, 1, 3, FaultClass.IN)
    leaf = walk(s1_cfg(affd=True), VA, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert leaf.output_base == 0x4_0000_0000


def test_input_beyond_input_size_faults_without_reading() -> None:
    mem = Memory()
    four_level(mem, s1_leaf(0x4_0000_0000, page=True))
    assert walk(s1_cfg(), 1 << 48, mem.read) == WalkFault(EventType.F_TRANSLATION, 1, 0, FaultClass.IN)
    assert walk(s1_cfg(ttb=L1, start_level=1, input_bits=39), VA, mem.read) == WalkFault(
        EventType.F_TRANSLATION, 1, 1, FaultClass.IN
    )
    assert mem.reads == []


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_external_abort_on_a_descriptor_read(level: int) -> None:
    mem = Memory()
    four_level(mem, s1_leaf(0x4_0000_0000, page=True))
    aborting = [D0, D1, D2, D3][level]
    mem.aborting.add(aborting)
    # A stage-1 walk abort is reported S2=0, CLASS=TT with the descriptor's PA (IHI 0070 §7.3.12).
    assert walk(s1_cfg(), VA, mem.read) == WalkFault(
        EventType.F_WALK_EABT, 1, level, FaultClass.TT, fetch_address=aborting
    )


# -- nested: stage-1 tables at IPAs ---------------------------------------------------------------------
IPA_TO_PA = 0x4000_0000  # the fake stage 2 maps IPA x to PA x + 1 GiB


def test_nested_walk_translates_every_table_address() -> None:
    mem = Memory()
    # The stage-1 tables are at IPAs L0..L3; their contents sit at PA = IPA + 1 GiB.
    mem.put(D0 + IPA_TO_PA, table(L1))
    mem.put(D1 + IPA_TO_PA, table(L2))
    mem.put(D2 + IPA_TO_PA, table(L3))
    mem.put(D3 + IPA_TO_PA, s1_leaf(0x7000, page=True))
    asked: list[int] = []

    def translate_table(ipa: int) -> int | WalkFault:
        asked.append(ipa)
        return ipa + IPA_TO_PA

    leaf = walk(s1_cfg(), VA, mem.read, translate_table)
    assert isinstance(leaf, WalkLeaf)
    assert asked == [D0, D1, D2, D3]
    assert leaf.path == tuple(d + IPA_TO_PA for d in (D0, D1, D2, D3))
    assert leaf.descriptor_address == D3 + IPA_TO_PA
    assert leaf.output_base == 0x7000  # the stage-1 output (an IPA), untouched by the walker


def test_nested_walk_returns_the_stage2_fault_unchanged() -> None:
    mem = Memory()
    mem.put(D0 + IPA_TO_PA, table(L1))
    mem.put(D1 + IPA_TO_PA, table(L2))
    s2_fault = WalkFault(EventType.F_TRANSLATION, 2, 3, FaultClass.IN, ipa=D2)

    def translate_table(ipa: int) -> int | WalkFault:
        return s2_fault if ipa == D2 else ipa + IPA_TO_PA

    assert walk(s1_cfg(), VA, mem.read, translate_table) is s2_fault
    assert mem.reads == [D0 + IPA_TO_PA, D1 + IPA_TO_PA]


# -- stage-1 permissions ------------------------------------------------------------------------------
def leaf_with(leaf_desc: int, cfg: WalkConfig | None = None, **table_attrs: dict[str, int]) -> WalkLeaf:
    mem = Memory()
    four_level(mem, leaf_desc, **table_attrs)
    leaf = walk(cfg or s1_cfg(), VA, mem.read)
    assert isinstance(leaf, WalkLeaf)
    return leaf


PAGE = 0x4_0000_0000


def test_aptable_1_removes_write_below() -> None:
    assert leaf_with(s1_leaf(PAGE, page=True, AP=0b01)).writable
    leaf = leaf_with(s1_leaf(PAGE, page=True, AP=0b01), l1={"APTABLE": 0b10})
    assert not leaf.writable
    assert leaf.unpriv


def test_aptable_0_removes_el0_access_below() -> None:
    leaf = leaf_with(s1_leaf(PAGE, page=True, AP=0b01), l0={"APTABLE": 0b01})
    assert not leaf.unpriv
    assert leaf.writable


def test_xntable_and_pxntable_remove_execute_below() -> None:
    leaf = leaf_with(s1_leaf(PAGE, page=True), l2={"XNTABLE": 1})
    assert (leaf.executable, leaf.priv_executable) == (False, True)
    leaf = leaf_with(s1_leaf(PAGE, page=True), l0={"PXNTABLE": 1})
    assert (leaf.executable, leaf.priv_executable) == (True, False)


def test_table_attributes_are_ignored_without_hierarchical_attrs() -> None:
    attrs = {"APTABLE": 0b11, "XNTABLE": 1, "PXNTABLE": 1}
    leaf = leaf_with(s1_leaf(PAGE, page=True, AP=0b01), s1_cfg(hierarchical_attrs=False), l1=attrs)
    assert (leaf.writable, leaf.unpriv, leaf.executable) == (True, True, True)


def test_leaf_uxn_pxn() -> None:
    leaf = leaf_with(s1_leaf(PAGE, page=True, UXN=1))
    assert (leaf.executable, leaf.priv_executable) == (False, True)
    leaf = leaf_with(s1_leaf(PAGE, page=True, PXN=1))
    assert (leaf.executable, leaf.priv_executable) == (True, False)


def test_el0_writable_memory_is_privileged_execute_never() -> None:
    assert not leaf_with(s1_leaf(PAGE, page=True, AP=0b01)).priv_executable  # EL0 RW
    assert leaf_with(s1_leaf(PAGE, page=True, AP=0b11)).priv_executable  # EL0 RO
    assert leaf_with(s1_leaf(PAGE, page=True, AP=0b00)).priv_executable  # EL1 RW only


def test_wxn_makes_writable_memory_execute_never() -> None:
    leaf = leaf_with(s1_leaf(PAGE, page=True, AP=0b00), s1_cfg(wxn=True))
    assert (leaf.executable, leaf.priv_executable) == (False, False)
    leaf = leaf_with(s1_leaf(PAGE, page=True, AP=0b10), s1_cfg(wxn=True))
    assert (leaf.executable, leaf.priv_executable) == (True, True)


def test_single_privilege_regime_ignores_ap1_pxn_and_ng() -> None:
    cfg = s1_cfg(single_privilege=True)
    leaf = leaf_with(s1_leaf(PAGE, page=True, AP=0b00, PXN=1, NG=1), cfg, l0={"APTABLE": 0b01, "PXNTABLE": 1})
    assert (leaf.unpriv, leaf.writable, leaf.executable, leaf.priv_executable) == (True, True, True, True)
    assert leaf.global_entry
    leaf = leaf_with(s1_leaf(PAGE, page=True, UXN=1), cfg)
    assert (leaf.executable, leaf.priv_executable) == (False, False)
    leaf = leaf_with(s1_leaf(PAGE, page=True), cfg, l1={"XNTABLE": 1})
    assert (leaf.executable, leaf.priv_executable) == (False, False)


# -- check_permission truth tables (Arm ARM AP[2:1] and S2AP tables) -----------------------------------
# AP[2:1] -> (privileged read, privileged write, EL0 read, EL0 write)
S1_AP_TABLE = {
    0b00: (True, True, False, False),
    0b01: (True, True, True, True),
    0b10: (True, False, False, False),
    0b11: (True, False, True, False),
}


@pytest.mark.parametrize("ap", sorted(S1_AP_TABLE))
def test_stage1_data_permissions(ap: int) -> None:
    leaf = leaf_with(s1_leaf(PAGE, page=True, AP=ap))
    got = tuple(
        check_permission(leaf, 1, is_write, privileged, False)
        for privileged in (True, False)
        for is_write in (False, True)
    )
    assert got == S1_AP_TABLE[ap]


@pytest.mark.parametrize(
    ("ap", "uxn", "pxn", "priv_fetch", "el0_fetch"),
    [
        (0b10, 0, 0, True, True),  # EL0 cannot read it but may execute it (execute-only)
        (0b11, 1, 0, True, False),
        (0b11, 0, 1, False, True),
        (0b01, 0, 0, False, True),  # EL0-writable: never executable at EL1
        (0b00, 1, 1, False, False),
    ],
)
def test_stage1_instruction_permissions(
    ap: int, uxn: int, pxn: int, priv_fetch: bool, el0_fetch: bool
) -> None:
    leaf = leaf_with(s1_leaf(PAGE, page=True, AP=ap, UXN=uxn, PXN=pxn))
    assert check_permission(leaf, 1, False, True, True) is priv_fetch
    assert check_permission(leaf, 1, False, False, True) is el0_fetch


def test_writes_are_data_even_when_marked_instruction() -> None:
    leaf = leaf_with(s1_leaf(PAGE, page=True, AP=0b10))  # read-only, executable
    assert not check_permission(leaf, 1, True, True, True)


# S2AP -> (read, write)
S2AP_TABLE = {0b00: (False, False), 0b01: (True, False), 0b10: (False, True), 0b11: (True, True)}


@pytest.mark.parametrize("s2ap", sorted(S2AP_TABLE))
@pytest.mark.parametrize("privileged", [True, False])
def test_stage2_data_permissions(s2ap: int, privileged: bool) -> None:
    mem = Memory()
    s2_tables(mem, s2_leaf(0x9000_0000, page=True, S2AP=s2ap))
    leaf = walk(s2_cfg(), IPA, mem.read)
    assert isinstance(leaf, WalkLeaf)
    got = (
        check_permission(leaf, 2, False, privileged, False),
        check_permission(leaf, 2, True, privileged, False),
    )
    assert got == S2AP_TABLE[s2ap]


@pytest.mark.parametrize(
    ("s2ap", "xn", "fetch"), [(0b11, 0b10, False), (0b00, 0b00, True), (0b01, 0b00, True)]
)
def test_stage2_instruction_needs_xn_clear_only(s2ap: int, xn: int, fetch: bool) -> None:
    mem = Memory()
    s2_tables(mem, s2_leaf(0x9000_0000, page=True, S2AP=s2ap, XN=xn))
    leaf = walk(s2_cfg(), IPA, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert check_permission(leaf, 2, False, True, True) is fetch
    assert check_permission(leaf, 2, False, False, True) is fetch


def test_ignored_table_descriptor_bits_do_not_affect_the_leaf() -> None:
    baseline = leaf_with(s1_leaf(PAGE, page=True, AP=0b01))
    mem = Memory()
    four_level(mem, s1_leaf(PAGE, page=True, AP=0b01))
    ignored = 0xFFC | (0x7F << 52)  # table descriptor bits [11:2] and [58:52] are IGNORED
    for d in (D0, D1, D2):
        mem.put(d, mem.ram.read_int(d, 8) | ignored)
    leaf = walk(s1_cfg(), VA, mem.read)
    assert isinstance(leaf, WalkLeaf)
    assert leaf == dataclasses.replace(baseline)
