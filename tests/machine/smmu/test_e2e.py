"""End to end: a device's DMA through a programmed SMMU lands at the physical address the tables
say (stage 1, stage 2, nested; 4K/16K/64K granules and mixes; linear and two-level stream tables).

Expected addresses come from the mappings the test itself made, never from the model."""

from __future__ import annotations

import os
import sys

import pytest

from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.smmu import SmmuFeatures

sys.path.insert(0, os.path.dirname(__file__))
from harness import IPA_OFFSET, RW, SmmuHarness, harness, map_pages, nested_stream

K4, K16, K64 = 4096, 16384, 65536


def _pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def _check_dma(h: SmmuHarness, ep: DmaEndpoint, iova: int, pa: int, size: int) -> None:
    """A write at ``iova`` lands at ``pa`` (read back from RAM), and a read returns it."""
    data = _pattern(size, seed=iova & 0xFF)
    result = ep.write(iova, data)
    assert result.ok, result
    assert h.read_mem(pa, size) == data
    assert h.read_mem(pa - 16, 16) == bytes(16)  # nothing before the target
    back = ep.read(iova, size)
    assert back.ok and back.data == data
    assert h.decoded_events() == []


@pytest.mark.parametrize("granule", [K4, K16, K64])
@pytest.mark.parametrize("two_level", [False, True])
def test_stage1_only(granule: int, two_level: bool) -> None:
    h = harness(two_level=two_level, log2size=12)
    pt = h.s1_table(granule, ias=48)
    # 4K with a 48-bit VA is a 4-level walk (levels 0-3); 16K 48-bit also starts at level 0.
    assert pt.config.start_level == (0 if granule in (K4, K16) else 1)
    buf = h.buffer(2 * granule, granule)
    iova = 0x8765_4000_0000 & ~(granule - 1)
    map_pages(pt, iova, buf, 2 * granule)
    cds = h.cd_table()
    h.write_cd(cds, 0, h.cd(pt, asid=3))
    sid = 0x123
    h.write_ste(sid, h.ste_s1(cds))
    ep = DmaEndpoint("dev", h.smmu, sid)
    # A DMA straddling the two pages.
    _check_dma(h, ep, iova + granule - 40, buf + granule - 40, 80)


@pytest.mark.parametrize("granule", [K4, K16, K64])
def test_stage2_only(granule: int) -> None:
    h = harness()
    s2 = h.s2_table(granule, ias=48)
    buf = h.buffer(2 * granule, granule)
    ipa = 0x1234_5600_0000 & ~(granule - 1)
    map_pages(s2, ipa, buf, 2 * granule)
    h.write_ste(7, h.ste_s2(s2, vmid=9))
    ep = DmaEndpoint("dev", h.smmu, 7)
    _check_dma(h, ep, ipa + 0x18, buf + 0x18, 64)
    _check_dma(h, ep, ipa + granule + 8, buf + granule + 8, 200)


def test_stage2_4k_is_a_four_level_walk() -> None:
    h = harness()
    s2 = h.s2_table(K4, ias=48)
    # 48-bit IPA, 4K: start level 0 (S2SL0 = 2), no concatenation.
    assert s2.config.start_level == 0 and s2.config.vtcr_fields()["S2SL0"] == 2
    buf = h.buffer()
    map_pages(s2, 0xFFFF_FFFF_F000, buf, K4)  # the very top of the IPA space
    h.write_ste(1, h.ste_s2(s2))
    _check_dma(h, DmaEndpoint("dev", h.smmu, 1), 0xFFFF_FFFF_F800, buf + 0x800, 0x100)


@pytest.mark.parametrize(
    ("s1_granule", "s2_granule"), [(K4, K4), (K4, K64), (K64, K4), (K16, K16), (K16, K4), (K64, K64)]
)
def test_nested(s1_granule: int, s2_granule: int) -> None:
    h = harness()
    n = nested_stream(h, s1_granule, s2_granule)
    assert h.read_mem(n.cd_pa, 8) != bytes(8)  # the CD really is at the PA behind its IPA
    ep = DmaEndpoint("dev", h.smmu, n.sid)
    half = n.size // 2
    _check_dma(h, ep, n.va + 0x100, n.pa + 0x100, 0x40)
    _check_dma(h, ep, n.va + half - 8, n.pa + half - 8, 16)  # crosses a page of both stages


def test_nested_tables_are_fetched_through_stage2() -> None:
    """The S1 table pages and the CD are only reachable through stage 2: the walk reads the PAs."""
    h = harness()
    reads: list[int] = []
    n = nested_stream(h)
    va, pa, ep = n.va, n.pa, DmaEndpoint("dev", h.smmu, n.sid)
    h.bus.observers.append(lambda a: reads.append(a.address) if a.initiator.purpose == "walk" else None)
    assert ep.write(va, b"hello").ok
    assert h.read_mem(pa, 5) == b"hello"
    # Every descriptor read is a physical access in RAM; none is at an IPA.
    assert reads and all(r < IPA_OFFSET for r in reads)
    s1_root_pa = n.s1_memory._pa(n.s1.root)
    assert s1_root_pa <= reads[-1] < s1_root_pa + K4 or any(s1_root_pa <= r < s1_root_pa + K4 for r in reads)


def test_stage1_block_mappings() -> None:
    """2 MB and 1 GB blocks with a 4K granule: the offset inside the block is preserved."""
    h = harness()
    pt = h.s1_table(K4)
    big = h.alloc(1 << 21, 1 << 21)
    map_pages(pt, 0x4000_0000_0000 + (1 << 21), big, 1 << 21)
    assert any(leaf.size == 1 << 21 for leaf in pt.walk_leaves())
    cds = h.cd_table()
    h.write_cd(cds, 0, h.cd(pt))
    h.write_ste(2, h.ste_s1(cds))
    ep = DmaEndpoint("dev", h.smmu, 2)
    _check_dma(h, ep, 0x4000_0000_0000 + (1 << 21) + 0x12_3450, big + 0x12_3450, 32)


def test_bypass_and_disabled() -> None:
    h = harness()
    buf = h.buffer()
    h.write_ste(4, h.ste_bypass())
    _check_dma(h, DmaEndpoint("dev", h.smmu, 4), buf + 4, buf + 4, 12)
    # SMMUEN=0 with GBPA at its bypass reset: every stream passes untranslated.
    h.enable(False)
    _check_dma(h, DmaEndpoint("dev", h.smmu, 0xFF), buf + 0x100, buf + 0x100, 8)


def test_substreams_select_their_cd() -> None:
    h = harness()
    pts = [h.s1_table() for _ in range(3)]
    bufs = [h.buffer() for _ in range(3)]
    for pt, buf in zip(pts, bufs, strict=True):
        map_pages(pt, 0x1000, buf, K4)
    cds = h.cd_table(4)
    for ssid, pt in enumerate(pts):
        h.write_cd(cds, ssid, h.cd(pt, asid=10 + ssid))
    h.write_ste(6, h.ste_s1(cds, cdmax=2, dss=2))  # S1DSS=SSID0: no-SSID traffic uses CD 0
    ep = DmaEndpoint("dev", h.smmu, 6)
    assert ep.write(0x1000, b"zero").ok
    assert ep.write(0x1000, b"one", ssid=1).ok
    assert ep.write(0x1000, b"two", ssid=2).ok
    assert [h.read_mem(b, 4) for b in bufs] == [b"zero", b"one\0", b"two\0"]


def test_two_level_cd_table() -> None:
    h = harness()
    pt = h.s1_table()
    buf = h.buffer()
    map_pages(pt, 0x2000, buf, K4)
    l1 = h.cd_table(1)  # S1CDMax=7, S1Fmt=1: 2 L1CDs of 64 CDs each
    leaf = h.cd_table(64)
    h.write_l1cd(l1, 1, leaf)
    h.write_cd(leaf, 100 - 64, h.cd(pt, asid=7))
    h.write_ste(8, h.ste_s1(l1, cdmax=7, fmt=1, dss=1))
    ep = DmaEndpoint("dev", h.smmu, 8)
    assert ep.write(0x2000, b"ssid100", ssid=100).ok
    assert h.read_mem(buf, 7) == b"ssid100"


def test_only_4k_implemented() -> None:
    """An SMMU that implements only the 4K granule still translates 4K tables."""
    h = harness(SmmuFeatures(granules=frozenset({K4})))
    s2 = h.s2_table(K4)
    buf = h.buffer()
    map_pages(s2, 0x8000, buf, K4, RW)
    h.write_ste(3, h.ste_s2(s2))
    _check_dma(h, DmaEndpoint("dev", h.smmu, 3), 0x8010, buf + 0x10, 16)
