"""The shadow stream table (v4 patches 23, 24, 28): the host table validated and shared on SMMUEN,
L2 tables allocated on first use, each host STE transformed (abort/invalid unchanged, bypass ->
stage-2 only, stage 1 -> nested, nested ignored) and installed dwords 1-7, CFGI_ALL + SYNC, dword 0."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import pytest

from pkvm_smmu.arch.commands import Opcode, build_command
from pkvm_smmu.arch.registers import Shcfg
from pkvm_smmu.arch.strtab import L1STD, STE, Eats, S1Dss, SteConfig
from pkvm_smmu.hyp.contracts import PageState
from pkvm_smmu.hyp.iommu import IommuCaps, identity_config
from pkvm_smmu.hyp.smmuv3 import IdentityS2, ShadowHow, V4Policy
from pkvm_smmu.machine.bus import Access, InitiatorKind
from pkvm_smmu.trace import TraceEvent

sys.path.insert(0, os.path.dirname(__file__))
from hyp_smmu_rig import HOST_L2, HOST_STRTAB, HostQueue, HostStreamTable, PkvmRig, make_rig

S2TTB = 0x8765_4000
CONFIG = identity_config([IommuCaps("s", 48, 48, (1 << 12) | (1 << 21) | (1 << 30), True)])
assert CONFIG is not None
S2 = IdentityS2(CONFIG.vtcr_fields(), S2TTB)
POLICY = V4Policy()
DWORDS_4_7 = ((1 << 256) - 1) << 256


class Ctx:
    """A stand-in ``SmmuContext`` for the pure transform."""

    name = "ctx"
    cmdq_enabled = smmu_enabled = two_level_strtab = True
    sid_bits = 16

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str, **fields: Any) -> None:
        self.warnings.append(message)

    def reshadow_ste(self, sid: int) -> None:
        raise AssertionError

    def write_u64(self, pa: int, value: int) -> None:
        raise AssertionError

    def send_cmd(self, command: int) -> int:
        raise AssertionError


# A host STE with junk where the hyp's fields go, and something in every dword it must keep.
HOST_JUNK = (
    STE.encode(S2VMID=7, S2T0SZ=25, S2PTW=1, S2HD=1, S2SL0=1)
    | STE.S2TTB.insert_address(0xDEAD_0000)
    | STE.encode(S2NSW=1)
    | STE.encode(PARTID=0x33, IMPDEF1=0x5)
)
KEPT_DWORD1 = STE.encode(EATS=Eats.TRANS, S1DSS=S1Dss.SSID0, PRIVCFG=2)


def transform(ste: int) -> tuple[int, ShadowHow, list[str]]:
    ctx = Ctx()
    out, how = POLICY.transform_ste(ctx, ste, S2)
    return out, how, ctx.warnings


def assert_identity_s2(ste: int) -> None:
    fields = STE.decode(ste)
    for name, value in CONFIG.vtcr_fields().items():
        assert fields[name] == value, name
    assert fields["S2VMID"] == 0 and fields["S2AA64"] == 1 and fields["S2R"] == 1
    assert fields["S2PTW"] == fields["S2HD"] == fields["S2NSW"] == 0  # dwords 2 and 3 replaced
    assert STE.S2TTB.get_address(ste) == S2TTB


def test_invalid_ste_is_copied_unchanged() -> None:
    host = STE.encode(CONFIG=SteConfig.S1_TRANS) | HOST_JUNK
    assert transform(host) == (host, ShadowHow.UNCHANGED, [])


def test_abort_ste_is_copied_unchanged() -> None:
    host = STE.encode(V=1, CONFIG=SteConfig.ABORT) | HOST_JUNK
    assert transform(host) == (host, ShadowHow.ABORT, [])


def test_bypass_becomes_stage2_only_with_the_identity_table() -> None:
    host = STE.encode(V=1, CONFIG=SteConfig.BYPASS) | KEPT_DWORD1 | HOST_JUNK
    out, how, warnings = transform(host)
    assert how is ShadowHow.S2_ONLY and not warnings
    assert STE.CONFIG.get(out) == SteConfig.S2_TRANS and STE.V.get(out)
    assert_identity_s2(out)
    assert STE.SHCFG.get(out) == Shcfg.INCOMING
    assert out & KEPT_DWORD1 == KEPT_DWORD1
    assert out & DWORDS_4_7 == host & DWORDS_4_7


def test_stage1_becomes_nested() -> None:
    host = STE.encode(V=1, CONFIG=SteConfig.S1_TRANS, S1CDMAX=3) | STE.S1CONTEXTPTR.insert_address(
        0x8100_0040
    )
    out, how, _ = transform(host | KEPT_DWORD1 | HOST_JUNK)
    assert how is ShadowHow.NESTED and STE.CONFIG.get(out) == SteConfig.NESTED
    assert STE.S1CONTEXTPTR.get_address(out) == 0x8100_0040 and STE.S1CDMAX.get(out) == 3
    assert_identity_s2(out)


def test_host_stage2_ste_gets_the_identity_table() -> None:
    out, how, _ = transform(STE.encode(V=1, CONFIG=SteConfig.S2_TRANS) | HOST_JUNK)
    assert how is ShadowHow.S2_ONLY and STE.CONFIG.get(out) == SteConfig.S2_TRANS
    assert_identity_s2(out)


def test_nested_host_ste_is_warned_about_and_copied_verbatim() -> None:
    host = STE.encode(V=1, CONFIG=SteConfig.NESTED) | HOST_JUNK
    out, how, warnings = transform(host)
    assert (out, how) == (host, ShadowHow.IGNORED_NESTED)  # the host's own S2TTB survives (v4)
    assert warnings == ["host STE asks for nesting: left as is"]


def test_shcfg_is_ored_with_incoming() -> None:
    out, _, _ = transform(STE.encode(V=1, CONFIG=SteConfig.BYPASS, SHCFG=Shcfg.OSH))
    assert STE.SHCFG.get(out) == Shcfg.ISH  # 0b10 | 0b01


# -- the shadow table on a live SMMU ------------------------------------------------------------------


@pytest.fixture
def r() -> PkvmRig:
    rig = make_rig()
    rig.sink.clear()
    return rig


def host_table(r: PkvmRig) -> tuple[HostQueue, HostStreamTable]:
    q = HostQueue(r)
    table = HostStreamTable(r, q)
    table.set_l2(0, HOST_L2)
    table.enable()
    return q, table


def test_smmuen_shares_and_pins_the_host_l1(r: PkvmRig) -> None:
    mp = r.pkvm.mem_protect
    host_table(r)
    l1_pfn = HOST_STRTAB >> 12  # 256 descriptors: one page
    assert mp.host_state(l1_pfn) is PageState.SHARED_OWNED and mp.pin_count(l1_pfn) == 1
    assert mp.host_state(l1_pfn + 1) is PageState.OWNED
    assert not r.warnings()
    r.host_write(0x20, r.hyp.cr0 & ~1)  # SMMUEN off
    assert mp.host_state(l1_pfn) is PageState.OWNED and mp.pin_count(l1_pfn) == 0


def test_host_format_is_validated(r: PkvmRig) -> None:
    q = HostQueue(r)
    HostStreamTable(r, q, split=6).enable()
    assert r.warnings() == ["host stream table split is not STRTAB_SPLIT"]


def test_first_cfgi_allocates_a_shadow_l2_and_pins_the_host_l2(r: PkvmRig) -> None:
    mp = r.pkvm.mem_protect
    _, table = host_table(r)
    host = STE.encode(V=1, CONFIG=SteConfig.BYPASS)
    table.write_ste(0x13, host)
    desc = r.ram(r.hyp.strtab_base, 8)
    l1 = int.from_bytes(desc, "little")
    assert L1STD.SPAN.get(l1) == 9
    shadow_l2 = L1STD.L2PTR.get_address(l1)
    assert r.pkvm.iommu_pool is not None and r.pkvm.iommu_pool.contains(shadow_l2)
    assert shadow_l2 % 0x4000 == 0  # naturally aligned 16 KiB L2
    host_pfns = range(HOST_L2 >> 12, (HOST_L2 >> 12) + 4)
    assert all(mp.host_state(p) is PageState.SHARED_OWNED and mp.pin_count(p) == 1 for p in host_pfns)
    assert mp.host_unshare_hyp(HOST_L2 >> 12) == -errno.EBUSY
    assert STE.CONFIG.get(r.shadow_ste(0x13)) == SteConfig.S2_TRANS
    # A second SID of the same L2: no new allocation.
    allocs = len(r.events("hyp.iommu", "pool.alloc"))
    table.write_ste(0x14, host)
    assert len(r.events("hyp.iommu", "pool.alloc")) == allocs
    assert len(r.events("hyp.smmuv3", "strtab.l2")) == 1
    # Disabling the SMMU unshares the L1, never the L2.
    r.host_write(0x20, r.hyp.cr0 & ~1)
    assert mp.pin_count(HOST_L2 >> 12) == 1
    assert r.counters.by_field("hyp.smmuv3", "ste.shadow", "how") == {"s2-only": 2}


def test_cfgi_ste_leaf0_is_not_shadowed(r: PkvmRig) -> None:
    _, table = host_table(r)
    table.write_ste(0x13, STE.encode(V=1, CONFIG=SteConfig.BYPASS), leaf=False)
    assert r.warnings() == ["CFGI_STE with Leaf=0 not shadowed"]
    assert not r.events("hyp.smmuv3", "ste.shadow")
    assert [c.split("(")[0] for c in r.consumed()] == ["CMD_CFGI_STE", "CMD_SYNC"]  # still reaches the SMMU


def test_sid_without_a_host_l2_is_not_shadowed(r: PkvmRig) -> None:
    q, _ = host_table(r)
    q.submit(build_command(Opcode.CFGI_STE, SID=0x300, LEAF=1))
    assert r.warnings() == ["host STE not found"]


def test_write_ordering_dwords_1_to_7_then_cfgi_all_then_dword_0(r: PkvmRig) -> None:
    _, table = host_table(r)
    table.write_ste(0x20, STE.encode(V=1, CONFIG=SteConfig.ABORT))  # the L2 exists from here on
    ste_pa = r.hyp._ste_ptr(0x20, r.hyp.strtab_base)
    assert ste_pa is not None
    log: list[tuple[str, int]] = []
    snapshots: list[int] = []

    def on_access(access: Access) -> None:
        ours = access.is_write and access.initiator.kind is InitiatorKind.CPU_EL2
        if ours and ste_pa <= access.address < ste_pa + 64:
            log.append(("write", (access.address - ste_pa) // 8))

    def on_event(event: TraceEvent) -> None:
        if event.component == r.smmu.name and event.kind == "cmd":
            log.append((event.fields["opcode"], 0))
            if event.fields["opcode"] == "CFGI_STE_RANGE":
                snapshots.append(STE.from_bytes(r.ram(ste_pa, 64)))

    r.bus.observers.append(on_access)
    r.trace.attach(on_event)
    target = STE.encode(V=1, CONFIG=SteConfig.BYPASS)
    table.write_ste(0x20, target)
    assert log == [
        *(("write", i) for i in range(1, 8)),
        ("CFGI_STE_RANGE", 0),
        ("SYNC", 0),
        ("write", 0),
        ("CFGI_STE", 0),  # the host's own, completing the update
        ("SYNC", 0),
    ]
    # When the SMMU saw the CFGI_ALL, the new dwords 1-7 were in place and dword 0 was still old.
    (mid,) = snapshots
    final = r.shadow_ste(0x20)
    assert mid & ~((1 << 64) - 1) == final & ~((1 << 64) - 1)
    assert STE.CONFIG.get(mid) == SteConfig.ABORT and STE.CONFIG.get(final) == SteConfig.S2_TRANS


def test_the_host_l2_is_read_through_the_current_l1_pointer(r: PkvmRig) -> None:
    """v4 as posted: only the first L2 seen for an L1 index is shared and pinned; if the host later
    repoints its L1 descriptor, the hyp follows it into memory it never shared."""
    mp = r.pkvm.mem_protect
    _, table = host_table(r)
    table.write_ste(0x20, STE.encode(V=1, CONFIG=SteConfig.ABORT))
    other = HOST_L2 + 0x10000
    table.set_l2(0, other)
    table.write_ste(0x20, STE.encode(V=1, CONFIG=SteConfig.BYPASS))
    assert STE.CONFIG.get(r.shadow_ste(0x20)) == SteConfig.S2_TRANS  # copied from the new L2
    assert mp.host_state(other >> 12) is PageState.OWNED  # never shared


def test_a_nested_host_ste_reaches_the_smmu_as_written(r: PkvmRig) -> None:
    _, table = host_table(r)
    host = STE.encode(V=1, CONFIG=SteConfig.NESTED, S2VMID=9) | STE.S2TTB.insert_address(0x8900_0000)
    table.write_ste(0x20, host)
    assert r.shadow_ste(0x20) == host
    assert r.counters.by_field("hyp.smmuv3", "ste.shadow", "how") == {"ignored-nested": 1}


def test_no_pool_memory_for_a_shadow_l2(r: PkvmRig) -> None:
    _, table = host_table(r)
    pool = r.pkvm.iommu_pool
    assert pool is not None
    while pool.alloc_page() is not None:
        pass
    table.write_ste(0x20, STE.encode(V=1, CONFIG=SteConfig.BYPASS))
    assert "no shadow L2 table" in r.warnings()
    assert r.events("hyp.iommu", "pool.exhausted")
    assert [c.split("(")[0] for c in r.consumed()] == ["CMD_CFGI_STE", "CMD_SYNC"]
