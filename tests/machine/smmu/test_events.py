"""Every event the model can produce, provoked by programming and checked field by field against
IHI 0070 §7.3 (record contents) and §5 / §3 (when each one arises). Also the fault configuration:
CD.R / STE.S2R suppress recording and CD.A = 0 terminates with RAZ/WI."""

from __future__ import annotations

import os
import sys

import pytest

from pkvm_smmu.arch.events import EventType, FaultClass
from pkvm_smmu.arch.registers import STRTAB_BASE, STRTAB_BASE_CFG, Reg
from pkvm_smmu.arch.strtab import CD, L1STD, STE
from pkvm_smmu.arch.vmsa import S1_LEAF, S2_LEAF
from pkvm_smmu.machine.devices import DmaEndpoint, DmaFailure
from pkvm_smmu.machine.smmu import SmmuFeatures
from pkvm_smmu.machine.smmu.types import Outcome
from pkvm_smmu.pgtable import IoPageTable, Prot

sys.path.insert(0, os.path.dirname(__file__))
from harness import (
    RW,
    NestedStream,
    SmmuHarness,
    harness,
    map_pages,
    nested_stream,
)

K4 = 4096
NO_RAM = 0x1_0000_0000  # 4 GiB: no region decodes it (RAM is at 2-3 GiB)
VA = 0x1234_5678_9000


def _ep(h: SmmuHarness, sid: int) -> DmaEndpoint:
    return DmaEndpoint(f"dev{sid:#x}", h.smmu, sid)


def _s1_stream(h: SmmuHarness, sid: int, prot: int = RW, **cd_fields: int) -> tuple[IoPageTable, int, int]:
    """An S1-only stream mapping VA -> a fresh page: (table, page PA, CD table)."""
    pt = h.s1_table()
    buf = h.buffer()
    map_pages(pt, VA, buf, K4, prot)
    cds = h.cd_table()
    h.write_cd(cds, 0, h.cd(pt, asid=1, **cd_fields))
    h.write_ste(sid, h.ste_s1(cds))
    return pt, buf, cds


def _s2_stream(h: SmmuHarness, sid: int, prot: int = RW, **ste_fields: int) -> tuple[IoPageTable, int]:
    s2 = h.s2_table()
    buf = h.buffer()
    map_pages(s2, VA, buf, K4, prot)
    h.write_ste(sid, h.ste_s2(s2, vmid=3, **ste_fields))
    return s2, buf


def _leaf_pa(pt: IoPageTable, iova: int) -> int:
    for leaf in pt.walk_leaves(iova, iova + 1):
        return leaf.pte_pa
    raise AssertionError(f"{iova:#x} not mapped")


# ---- C_BAD_STREAMID (§7.3.3) ---------------------------------------------------------------------


def test_bad_streamid_out_of_range_recorded() -> None:
    h = harness(log2size=8, recinvsid=True)
    result = _ep(h, 0x100).write(0x1000, b"x")
    assert not result.ok and result.failure is DmaFailure.ABORT
    etype, f = h.one_event()
    assert etype is EventType.C_BAD_STREAMID
    assert f["SID"] == 0x100 and f["SSV"] == 0


def test_bad_streamid_carries_substream() -> None:
    h = harness(log2size=4, recinvsid=True)
    assert not _ep(h, 0x20).read(0, 4, ssid=0x345).ok
    etype, f = h.one_event()
    assert etype is EventType.C_BAD_STREAMID and f == {"SID": 0x20, "SSV": 1, "SSID": 0x345}


def test_bad_streamid_not_recorded_without_recinvsid() -> None:
    h = harness(log2size=8, recinvsid=False)
    result = _ep(h, 0x1000).write(0x1000, b"x")
    assert not result.ok
    assert h.decoded_events() == []


def test_bad_streamid_l1std_span_zero() -> None:
    h = harness(two_level=True, log2size=10, split=6)
    h.set_l1std(3, 0, h.alloc(64 << 6, 64 << 6))  # Span 0: invalid, whatever L2Ptr says
    assert not _ep(h, (3 << 6) | 5).write(0, b"x").ok
    etype, f = h.one_event()
    assert etype is EventType.C_BAD_STREAMID and f["SID"] == (3 << 6) | 5


@pytest.mark.parametrize("span", [8, 12, 31])  # > SPLIT + 1, or reserved
def test_bad_streamid_l1std_span_too_large(span: int) -> None:
    h = harness(two_level=True, log2size=10, split=6)
    l2 = h.alloc(64 << 8, 64 << 8)
    h.write_mem(l2, STE.to_bytes(h.ste_bypass()))
    h.set_l1std(1, span, l2)
    assert not _ep(h, 1 << 6).write(0, b"x").ok
    assert h.one_event()[0] is EventType.C_BAD_STREAMID


def test_bad_streamid_l2_index_beyond_span() -> None:
    h = harness(two_level=True, log2size=10, split=6)
    l2 = h.alloc(64 * 2, 128)
    buf = h.buffer()
    for i in range(4):  # even STEs beyond the span are valid bypass STEs: never fetched
        h.write_mem(l2 + 64 * i, STE.to_bytes(h.ste_bypass()))
    h.set_l1std(2, 2, l2)  # Span 2: 2^(2-1) = 2 STEs
    base_sid = 2 << 6
    assert _ep(h, base_sid + 1).write(buf, b"ok").ok  # index 1 < 2
    assert h.read_mem(buf, 2) == b"ok"
    assert not _ep(h, base_sid + 2).write(buf, b"no").ok  # index 2 >= 2^(Span-1)
    etype, f = h.one_event()
    assert etype is EventType.C_BAD_STREAMID and f["SID"] == base_sid + 2


# ---- F_STE_FETCH (§7.3.4) ------------------------------------------------------------------------


def test_ste_fetch_linear_table_in_unmapped_pa() -> None:
    h = harness(enable=False)
    h.write_reg(Reg.STRTAB_BASE, STRTAB_BASE.ADDR.insert_address(NO_RAM))
    h.write_reg(Reg.STRTAB_BASE_CFG, STRTAB_BASE_CFG.encode(LOG2SIZE=8))
    h.enable()
    assert not _ep(h, 0x42).read(0x1000, 8, ssid=None).ok
    etype, f = h.one_event()
    assert etype is EventType.F_STE_FETCH
    assert f["SID"] == 0x42 and f["FETCHADDR"] == NO_RAM + 0x42 * 64


def test_ste_fetch_l2_table_in_unmapped_pa() -> None:
    h = harness(two_level=True, log2size=10, split=6)
    h.set_l1std(1, 7, NO_RAM)
    assert not _ep(h, (1 << 6) + 3).write(0, b"x").ok
    etype, f = h.one_event()
    assert etype is EventType.F_STE_FETCH and f["FETCHADDR"] == NO_RAM + 3 * 64


def test_ste_fetch_l1_table_in_unmapped_pa() -> None:
    h = harness(enable=False)
    h.write_reg(Reg.STRTAB_BASE, STRTAB_BASE.ADDR.insert_address(NO_RAM))
    h.write_reg(Reg.STRTAB_BASE_CFG, STRTAB_BASE_CFG.encode(LOG2SIZE=10, SPLIT=6, FMT=1))
    h.enable()
    assert not _ep(h, (5 << 6) | 1).read(0, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_STE_FETCH and f["FETCHADDR"] == NO_RAM + 5 * 8  # the L1STD


def test_ste_fetch_is_not_cached() -> None:
    """A failed fetch is retried next time (§3.21: aborted fetches are not cached)."""
    h = harness(two_level=True, log2size=10, split=6)
    h.set_l1std(1, 7, NO_RAM)
    ep = _ep(h, (1 << 6) + 3)
    assert not ep.write(0, b"x").ok
    assert h.one_event()[0] is EventType.F_STE_FETCH
    buf = h.buffer()
    l2 = h.alloc(64 << 6, 64 << 6)
    h.write_mem(l2 + 3 * 64, STE.to_bytes(h.ste_bypass()))
    # The L1STD itself was fetched fine and may be cached: change it through CFGI_STE Leaf=0.
    h.set_l1std(1, 7, l2)
    h.cfgi_ste((1 << 6) + 3, leaf=False)
    assert ep.write(buf, b"y").ok and h.read_mem(buf, 1) == b"y"


# ---- C_BAD_STE (§7.3.5, §5.2.2) ------------------------------------------------------------------


def _bad_ste(h: SmmuHarness, sid: int, ste: int) -> None:
    h.write_ste(sid, ste)
    assert not _ep(h, sid).write(0x1000, b"x", ssid=None).ok
    etype, f = h.one_event()
    assert etype is EventType.C_BAD_STE and f == {"SID": sid, "SSV": 0, "SSID": 0}


def test_bad_ste_invalid() -> None:
    h = harness()
    _bad_ste(h, 9, h.ste_bypass() & ~STE.V.in_place_mask)


def test_bad_ste_illegal_s2t0sz() -> None:
    h = harness()
    s2 = h.s2_table()
    # S2T0SZ = 10: a 54-bit IPA exceeds the 48-bit IAS (and 48 bits with a 4K granule).
    _bad_ste(h, 10, STE.S2T0SZ.set(h.ste_s2(s2), 10))


def test_bad_ste_s2t0sz_inconsistent_with_sl0() -> None:
    h = harness()
    s2 = h.s2_table()  # 48-bit, SL0=2 (level 0)
    # S2T0SZ = 34 (30-bit IPA) cannot start at level 0 of a 4K table: ILLEGAL in v3.1+.
    _bad_ste(h, 11, STE.S2T0SZ.set(h.ste_s2(s2), 34))


def test_bad_ste_reserved_s2tg() -> None:
    h = harness()
    _bad_ste(h, 12, STE.S2TG.set(h.ste_s2(h.s2_table()), 3))


def test_bad_ste_unimplemented_s2_granule() -> None:
    h = harness(SmmuFeatures(granules=frozenset({K4})))
    ste = h.ste_s2(h.s2_table())
    _bad_ste(h, 13, STE.S2TG.set(ste, 1))  # 64K not implemented


def test_bad_ste_stage_not_implemented() -> None:
    h = harness(SmmuFeatures(stage2=False))
    cds = h.cd_table()
    h.write_cd(cds, 0, h.cd(h.s1_table()))
    _bad_ste(h, 14, STE.CONFIG.set(h.ste_s1(cds), 0b111))


def test_bad_ste_cdmax_beyond_ssidsize() -> None:
    h = harness(SmmuFeatures(ssid_bits=4))
    _bad_ste(h, 15, h.ste_s1(h.cd_table(64), cdmax=5))


@pytest.mark.parametrize("config", [0b000, 0b001, 0b010, 0b011])
def test_config_abort_is_silent(config: int) -> None:
    h = harness()
    h.write_ste(16, STE.encode(V=1, CONFIG=config))
    assert not _ep(h, 16).write(0, b"x").ok
    assert h.decoded_events() == []


# ---- C_BAD_SUBSTREAMID (§7.3.9) and F_STREAM_DISABLED (§7.3.7) --------------------------------------


def _bad_ssid(h: SmmuHarness, sid: int, ssid: int) -> None:
    assert not _ep(h, sid).write(VA, b"x", ssid=ssid).ok
    etype, f = h.one_event()
    assert etype is EventType.C_BAD_SUBSTREAMID and f == {"SID": sid, "SSID": ssid}


def test_bad_substream_without_substreams() -> None:
    h = harness()
    _s1_stream(h, 20)  # S1CDMax = 0
    _bad_ssid(h, 20, 1)


def test_bad_substream_stage2_only() -> None:
    h = harness()
    _s2_stream(h, 21)
    _bad_ssid(h, 21, 0)


def test_bad_substream_beyond_cdmax() -> None:
    h = harness()
    cds = h.cd_table(4)
    pt = h.s1_table()
    for i in range(4):
        h.write_cd(cds, i, h.cd(pt))
    h.write_ste(22, h.ste_s1(cds, cdmax=2))
    _bad_ssid(h, 22, 4)


def test_bad_substream_l1cd_invalid() -> None:
    h = harness()
    l1 = h.cd_table(1)
    h.write_ste(23, h.ste_s1(l1, cdmax=8, fmt=1))
    _bad_ssid(h, 23, 70)  # L1CD index 1 has V = 0


def test_bad_substream_when_ssids_not_implemented() -> None:
    h = harness(SmmuFeatures(ssid_bits=0))
    _s1_stream(h, 24)
    _bad_ssid(h, 24, 0)


def test_stream_disabled_without_substream() -> None:
    h = harness()
    cds = h.cd_table(4)
    h.write_ste(25, h.ste_s1(cds, cdmax=2, dss=0))
    assert not _ep(h, 25).write(VA, b"x").ok
    etype, f = h.one_event()
    assert etype is EventType.F_STREAM_DISABLED and f == {"SID": 25}


def test_stream_disabled_ssid0_reserved_by_dss() -> None:
    h = harness()
    pt = h.s1_table()
    cds = h.cd_table(4)
    for i in range(4):
        h.write_cd(cds, i, h.cd(pt))
    h.write_ste(26, h.ste_s1(cds, cdmax=2, dss=2))
    assert not _ep(h, 26).write(VA, b"x", ssid=0).ok
    etype, f = h.one_event()
    assert etype is EventType.F_STREAM_DISABLED and f == {"SID": 26}


# ---- F_CD_FETCH (§7.3.10) and C_BAD_CD (§7.3.11) ------------------------------------------------------


def test_cd_fetch_unmapped() -> None:
    h = harness()
    h.write_ste(30, h.ste_s1(NO_RAM, cdmax=4, dss=1))
    assert not _ep(h, 30).read(VA, 4, ssid=3).ok
    etype, f = h.one_event()
    assert etype is EventType.F_CD_FETCH
    assert f["SID"] == 30 and f["SSV"] == 1 and f["SSID"] == 3 and f["FETCHADDR"] == NO_RAM + 3 * 64


def test_cd_fetch_l1cd_unmapped() -> None:
    h = harness()
    h.write_ste(31, h.ste_s1(NO_RAM, cdmax=8, fmt=1, dss=1))
    assert not _ep(h, 31).read(VA, 4, ssid=130).ok  # L1CD index 2
    etype, f = h.one_event()
    assert etype is EventType.F_CD_FETCH and f["FETCHADDR"] == NO_RAM + 2 * 8


@pytest.mark.parametrize(
    "change",
    [
        {"V": 0},
        {"T0SZ": 10},  # 54-bit VA
        {"T0SZ": 40},  # beyond the 39 maximum without STT
        {"TG0": 3},  # reserved granule
        {"AA64": 0},  # AArch32 tables not implemented
        {"HA": 1},  # no HTTU
    ],
)
def test_bad_cd(change: dict[str, int]) -> None:
    h = harness()
    pt = h.s1_table()
    cds = h.cd_table()
    cd = h.cd(pt)
    for name, value in change.items():
        cd = CD.field(name).set(cd, value)
    h.write_cd(cds, 0, cd)
    h.write_ste(32, h.ste_s1(cds))
    assert not _ep(h, 32).write(VA, b"x").ok
    etype, f = h.one_event()
    assert etype is EventType.C_BAD_CD and f == {"SID": 32, "SSV": 0, "SSID": 0}


# ---- F_WALK_EABT (§7.3.12) -------------------------------------------------------------------------


def test_walk_eabt_stage1() -> None:
    h = harness()
    cds = h.cd_table()
    pt = h.s1_table()
    cd = CD.TTB0.set_address(h.cd(pt), NO_RAM)  # table base in unmapped PA
    h.write_cd(cds, 0, cd)
    h.write_ste(40, h.ste_s1(cds))
    assert not _ep(h, 40).read(VA, 8).ok
    etype, f = h.one_event()
    assert etype is EventType.F_WALK_EABT
    level0_index = (VA >> 39) & 0x1FF
    assert f["S2"] == 0 and f["CLASS"] == FaultClass.TT
    assert f["FETCHADDR"] == NO_RAM + 8 * level0_index
    assert f["INPUTADDR"] == VA and f["RNW"] == 1 and f["SID"] == 40


def test_walk_eabt_stage2_input() -> None:
    h = harness()
    s2 = h.s2_table()
    ste = STE.S2TTB.set_address(h.ste_s2(s2), NO_RAM)
    h.write_ste(41, ste)
    assert not _ep(h, 41).write(VA, b"x").ok
    etype, f = h.one_event()
    assert etype is EventType.F_WALK_EABT
    assert f["S2"] == 1 and f["CLASS"] == FaultClass.IN and f["RNW"] == 0
    assert f["FETCHADDR"] == NO_RAM + 8 * ((VA >> 39) & 0x1FF)


def _s2_leaf_of(n: NestedStream, ipa: int) -> int:
    """PA of the stage-2 leaf descriptor mapping ``ipa``."""
    return _leaf_pa(n.s2, ipa)


def test_walk_eabt_nested_stage1_descriptor() -> None:
    """A stage-1 descriptor IPA that stage 2 maps to unmapped PA: S2 = 0, CLASS = TT, FetchAddr is
    the stage-1 descriptor's PA (§7.3.12)."""
    h = harness()
    n = nested_stream(h)
    root_ipa = n.s1.root
    leaf = _s2_leaf_of(n, root_ipa)
    desc = h.read_u64(leaf)
    h.write_u64(leaf, S2_LEAF.OA.set_address(desc, NO_RAM))  # the S1 root's page now goes nowhere
    assert not _ep(h, n.sid).read(n.va, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_WALK_EABT
    assert f["S2"] == 0 and f["CLASS"] == FaultClass.TT
    assert f["FETCHADDR"] == NO_RAM + (root_ipa & 0xFFF) + 8 * ((n.va >> 39) & 0x1FF)


def test_walk_eabt_nested_cd_fetch_stage2_descriptor() -> None:
    """Stage 2 walk for the CD's IPA reads an unmapped PA: S2 = 1, CLASS = CD (§7.3.12)."""
    h = harness()
    n = nested_stream(h)
    ste = STE.S2TTB.set_address(h.read_ste(n.sid), NO_RAM)
    h.write_ste(n.sid, ste)
    assert not _ep(h, n.sid).read(n.va, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_WALK_EABT
    assert f["S2"] == 1 and f["CLASS"] == FaultClass.CD
    assert f["FETCHADDR"] == NO_RAM + 8 * ((n.cd_ipa >> 39) & 0x1FF)


# ---- F_TRANSLATION (§7.3.13) -------------------------------------------------------------------------


def test_translation_stage1() -> None:
    h = harness()
    _s1_stream(h, 50)
    assert not _ep(h, 50).write(VA + K4, b"x", privileged=True).ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSLATION
    assert f["S2"] == 0 and f["CLASS"] == FaultClass.IN and f["INPUTADDR"] == VA + K4
    assert f["RNW"] == 0 and f["PNU"] == 1 and f["IND"] == 0 and f["SID"] == 50 and f["SSV"] == 0


def test_translation_stage1_outside_t0sz_and_epd1() -> None:
    h = harness()
    _s1_stream(h, 51)
    ep = _ep(h, 51)
    upper = 0xFFFF_8000_0000_1000  # a TTB1 address: TTB1 is disabled (EPD1)
    assert not ep.read(upper, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSLATION and f["INPUTADDR"] == upper and f["S2"] == 0
    assert not ep.read(1 << 50, 4).ok  # in neither the TTB0 nor the TTB1 range
    assert h.one_event()[0] is EventType.F_TRANSLATION


def test_translation_stage1_instruction_read() -> None:
    h = harness()
    _s1_stream(h, 52)
    assert not _ep(h, 52).read(VA + 2 * K4, 4, instruction=True, privileged=True).ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSLATION and f["IND"] == 1 and f["RNW"] == 1 and f["PNU"] == 1


def test_translation_with_substream() -> None:
    h = harness()
    pt = h.s1_table()
    cds = h.cd_table(4)
    h.write_cd(cds, 3, h.cd(pt))
    h.write_ste(53, h.ste_s1(cds, cdmax=2, dss=1))
    assert not _ep(h, 53).write(VA, b"x", ssid=3).ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSLATION and f["SSV"] == 1 and f["SSID"] == 3


def test_translation_stage2_only() -> None:
    h = harness()
    _s2_stream(h, 54)
    addr = VA + 3 * K4 + 0x123
    assert not _ep(h, 54).read(addr, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSLATION
    assert f["S2"] == 1 and f["CLASS"] == FaultClass.IN and f["IPA"] == addr & ~0xFFF
    assert f["INPUTADDR"] == addr and f["RNW"] == 1


def test_translation_nested_input() -> None:
    h = harness()
    n = nested_stream(h)
    va = n.va + 0x10_0000
    hole_ipa = n.ipa + 0x100_0000
    map_pages(n.s1, va, hole_ipa, K4)  # stage 1 maps it, stage 2 does not
    assert not _ep(h, n.sid).write(va + 8, b"x").ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSLATION
    assert f["S2"] == 1 and f["CLASS"] == FaultClass.IN
    assert f["IPA"] == hole_ipa and f["INPUTADDR"] == va + 8


def test_translation_nested_stage1_table_walk() -> None:
    """A stage-1 table page whose IPA stage 2 does not map: S2 = 1, CLASS = TT, IPA = the
    stage-1 descriptor's IPA (§7.3.13)."""
    h = harness()
    n = nested_stream(h)
    root_ipa = n.s1.root
    n.s2.unmap(root_ipa & ~0xFFF, K4)
    assert not _ep(h, n.sid).read(n.va, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSLATION
    assert f["S2"] == 1 and f["CLASS"] == FaultClass.TT
    desc_ipa = root_ipa + 8 * ((n.va >> 39) & 0x1FF)
    assert f["IPA"] == desc_ipa & ~0xFFF and f["INPUTADDR"] == n.va


def test_translation_nested_cd_fetch() -> None:
    h = harness()
    n = nested_stream(h)
    n.s2.unmap(n.cd_ipa & ~0xFFF, K4)
    assert not _ep(h, n.sid).read(n.va, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_TRANSLATION
    assert f["S2"] == 1 and f["CLASS"] == FaultClass.CD and f["IPA"] == n.cd_ipa & ~0xFFF


# ---- F_ADDR_SIZE (§7.3.14) -------------------------------------------------------------------------


def test_addr_size_stage1_output_beyond_ips() -> None:
    h = harness()
    pt = h.s1_table()
    map_pages(pt, VA, 0x10_0000_0000, K4)  # a 37-bit PA
    cds = h.cd_table()
    h.write_cd(cds, 0, h.cd(pt, IPS=0))  # 32-bit IPS
    h.write_ste(60, h.ste_s1(cds))
    assert not _ep(h, 60).read(VA, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_ADDR_SIZE and f["S2"] == 0 and f["CLASS"] == FaultClass.IN
    assert f["INPUTADDR"] == VA


def test_addr_size_stage2_output_beyond_s2ps() -> None:
    h = harness()
    s2 = h.s2_table(K4, ias=40)
    map_pages(s2, 0x1000, 0x10_0000_0000, K4)
    ste = h.ste_s2(s2)
    h.write_ste(61, STE.S2PS.set(ste, 0))  # 32-bit output
    assert not _ep(h, 61).write(0x1010, b"x").ok
    etype, f = h.one_event()
    assert etype is EventType.F_ADDR_SIZE and f["S2"] == 1 and f["IPA"] == 0x1000


def test_addr_size_stage1_bypassed_input_beyond_ias() -> None:
    """Stage 1 bypassed (stage-2-only stream): an input above the IAS is a stage-1 address size
    fault (§3.4.1), not a stage-2 translation fault."""
    h = harness()
    _s2_stream(h, 62)
    addr = 1 << 50
    assert not _ep(h, 62).read(addr, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_ADDR_SIZE and f["S2"] == 0 and f["INPUTADDR"] == addr


# ---- F_ACCESS (§7.3.15) -------------------------------------------------------------------------------


def test_access_flag_stage1() -> None:
    h = harness()
    pt, _, _ = _s1_stream(h, 70)
    pte = _leaf_pa(pt, VA)
    h.write_u64(pte, S1_LEAF.AF.set(h.read_u64(pte), 0))
    assert not _ep(h, 70).read(VA + 4, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_ACCESS and f["S2"] == 0 and f["INPUTADDR"] == VA + 4


def test_access_flag_disabled_by_affd() -> None:
    h = harness()
    pt, buf, _ = _s1_stream(h, 71, AFFD=1)
    pte = _leaf_pa(pt, VA)
    h.write_u64(pte, S1_LEAF.AF.set(h.read_u64(pte), 0))
    assert _ep(h, 71).write(VA, b"ok").ok and h.read_mem(buf, 2) == b"ok"


def test_access_flag_stage2() -> None:
    h = harness()
    s2, _ = _s2_stream(h, 72)
    pte = _leaf_pa(s2, VA)
    h.write_u64(pte, S2_LEAF.AF.set(h.read_u64(pte), 0))
    assert not _ep(h, 72).read(VA + 4, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_ACCESS and f["S2"] == 1 and f["IPA"] == VA and f["CLASS"] == FaultClass.IN


# ---- F_PERMISSION (§7.3.16) -----------------------------------------------------------------------------


def test_permission_stage1_write_to_read_only() -> None:
    h = harness()
    _, buf, _ = _s1_stream(h, 80, Prot.READ)
    ep = _ep(h, 80)
    assert ep.read(VA, 4).ok
    result = ep.write(VA + 0x10, b"x")
    assert not result.ok
    etype, f = h.one_event()
    assert etype is EventType.F_PERMISSION
    assert f["S2"] == 0 and f["RNW"] == 0 and f["INPUTADDR"] == VA + 0x10 and f["CLASS"] == FaultClass.IN
    assert h.read_mem(buf + 0x10, 1) == b"\0"


def test_permission_stage1_unprivileged_to_privileged_page() -> None:
    h = harness()
    _s1_stream(h, 81, RW | Prot.PRIV)
    ep = _ep(h, 81)
    assert ep.read(VA, 4, privileged=True).ok
    assert not ep.read(VA, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_PERMISSION and f["PNU"] == 0 and f["RNW"] == 1 and f["S2"] == 0


def test_permission_stage2_write_to_read_only() -> None:
    h = harness()
    _s2_stream(h, 82, Prot.READ)
    ep = _ep(h, 82)
    assert ep.read(VA, 4).ok
    assert not ep.write(VA + 0x20, b"x").ok
    etype, f = h.one_event()
    assert etype is EventType.F_PERMISSION
    assert f["S2"] == 1 and f["CLASS"] == FaultClass.IN and f["IPA"] == VA and f["RNW"] == 0


def test_permission_nested_stage2_on_output() -> None:
    h = harness()
    n = nested_stream(h)
    n.s2.unmap(n.ipa, K4)
    map_pages(n.s2, n.ipa, n.pa, K4, Prot.READ)
    ep = _ep(h, n.sid)
    assert ep.read(n.va, 4).ok
    assert not ep.write(n.va + 8, b"x").ok
    etype, f = h.one_event()
    assert etype is EventType.F_PERMISSION
    assert f["S2"] == 1 and f["CLASS"] == FaultClass.IN and f["IPA"] == n.ipa and f["INPUTADDR"] == n.va + 8


def test_permission_nested_stage1_first() -> None:
    """Stage 1 forbids and stage 2 forbids too: stage 1's fault is the one reported."""
    h = harness()
    n = nested_stream(h)
    n.s1.unmap(n.va, K4)
    map_pages(n.s1, n.va, n.ipa, K4, Prot.READ)
    n.s2.unmap(n.ipa, K4)
    map_pages(n.s2, n.ipa, n.pa, K4, Prot.READ)
    assert not _ep(h, n.sid).write(n.va, b"x").ok
    etype, f = h.one_event()
    assert etype is EventType.F_PERMISSION and f["S2"] == 0


# ---- fault configuration: CD.R, STE.S2R, CD.A (§5.5) --------------------------------------------------


def test_cd_r0_suppresses_stage1_records() -> None:
    h = harness()
    _s1_stream(h, 90, record=False)
    assert not _ep(h, 90).write(VA + K4, b"x").ok  # still aborts (A = 1)
    assert h.decoded_events() == []


def test_ste_s2r0_suppresses_stage2_records() -> None:
    h = harness()
    s2 = h.s2_table()
    h.write_ste(91, h.ste_s2(s2, s2r=False))
    assert not _ep(h, 91).write(VA, b"x").ok
    assert h.decoded_events() == []


def test_ste_s2r0_suppresses_nested_stage2_records() -> None:
    h = harness()
    n = nested_stream(h, s2r=False)
    map_pages(n.s1, n.va + 0x10_0000, n.ipa + 0x100_0000, K4)
    assert not _ep(h, n.sid).write(n.va + 0x10_0000, b"x").ok
    assert h.decoded_events() == []


def test_cd_r0_does_not_suppress_configuration_errors() -> None:
    h = harness()
    pt = h.s1_table()
    cds = h.cd_table()
    h.write_cd(cds, 0, CD.V.set(h.cd(pt, record=False), 0))
    h.write_ste(92, h.ste_s1(cds))
    assert not _ep(h, 92).write(VA, b"x").ok
    assert h.one_event()[0] is EventType.C_BAD_CD


def test_cd_a0_terminates_raz_wi() -> None:
    h = harness()
    _, buf, _ = _s1_stream(h, 93, abort=False, record=True)
    h.write_mem(buf, b"keep")
    ep = _ep(h, 93)
    # A fault with A = 0: reads return zeros, writes are ignored, the device sees success.
    hole = VA + K4
    got = ep.read(hole, 16)
    assert got.ok and got.data == bytes(16)
    put = ep.write(hole, b"gone")
    assert put.ok and put.outcome is Outcome.RAZ_WI
    events = h.decoded_events()
    assert [e[0] for e in events] == [EventType.F_TRANSLATION, EventType.F_TRANSLATION]
    assert [e[1]["RNW"] for e in events] == [1, 0]
    assert h.read_mem(buf, 4) == b"keep"  # the valid page is untouched


def test_cd_a0_r0_terminates_silently() -> None:
    h = harness()
    _s1_stream(h, 94, abort=False, record=False)
    got = _ep(h, 94).read(VA + K4, 8)
    assert got.ok and got.data == bytes(8)
    assert h.decoded_events() == []


def test_cd_a0_does_not_apply_to_stage2_faults() -> None:
    """Stage-2 faults always abort (A is effectively 1 for stage 2)."""
    h = harness()
    n = nested_stream(h)
    cd = h.cd(n.s1, asid=n.asid, abort=False)
    h.write_cd(n.cd_ipa, 0, cd, memory=n.s1_memory)
    map_pages(n.s1, n.va + 0x10_0000, n.ipa + 0x100_0000, K4)
    result = _ep(h, n.sid).write(n.va + 0x10_0000, b"x")
    assert not result.ok and result.outcome is Outcome.ABORT
    assert h.one_event()[0] is EventType.F_TRANSLATION


def test_raz_wi_write_leaves_memory_alone() -> None:
    h = harness()
    _, buf, _ = _s1_stream(h, 95, Prot.READ, abort=False)
    h.write_mem(buf, b"orig")
    put = _ep(h, 95).write(VA, b"evil")  # permission fault, terminated RAZ/WI
    assert put.ok and put.outcome is Outcome.RAZ_WI
    assert h.read_mem(buf, 4) == b"orig"
    assert h.one_event()[0] is EventType.F_PERMISSION


# ---- events while the queue is not writable ----------------------------------------------------------


def test_no_records_when_eventq_disabled() -> None:
    h = harness()
    _s1_stream(h, 96)
    from pkvm_smmu.arch.registers import CR0

    h.set_cr0(CR0.encode(SMMUEN=1, CMDQEN=1))  # EVENTQEN = 0
    result = _ep(h, 96).write(VA + K4, b"x")
    assert not result.ok and result.event is not None  # the SMMU made a record ...
    h.set_cr0(CR0.encode(SMMUEN=1, CMDQEN=1, EVENTQEN=1))
    assert h.decoded_events() == []  # ... but it was discarded, not queued for later


def test_l1std_record_uses_l1std_address_field() -> None:
    h = harness(two_level=True, log2size=10, split=6)
    h.set_l1std(0, 7, NO_RAM + 0x1000)
    assert not _ep(h, 1).read(0, 4).ok
    etype, f = h.one_event()
    assert etype is EventType.F_STE_FETCH and f["FETCHADDR"] == NO_RAM + 0x1000 + 64
    assert L1STD.SPAN.get(h.read_u64(h.strtab.base)) == 7  # type: ignore[union-attr]
