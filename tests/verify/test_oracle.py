"""The isolation oracle flags exactly the planted problems: on a hand-programmed SMMU (the machine
harness, with pKVM's page ownership over its RAM) and on the pKVM system as the hyp tests build it."""

from __future__ import annotations

import os
import sys

import pytest

from pkvm_smmu.arch.commands import CMD_SIZE, Opcode, SyncCs, build_command
from pkvm_smmu.arch.registers import CR0, GBPA, IRQ_CTRL, Reg
from pkvm_smmu.arch.strtab import CD, STE, Eats, S1Dss, SteConfig
from pkvm_smmu.arch.vmsa import GRANULES
from pkvm_smmu.hyp.contracts import guest
from pkvm_smmu.hyp.mem_protect import MemProtect
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.pgtable import IoPageTable, PageTableConfig, Prot, RangePageAllocator
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.trace import TraceBus
from pkvm_smmu.verify.oracle import IsolationOracle, Violation

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "machine", "smmu"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "hyp", "smmuv3"))
from harness import RW, SmmuHarness, harness, map_pages
from hyp_smmu_rig import (
    BUF,
    HOST_L2,
    HostQueue,
    HostStreamTable,
    PkvmRig,
    PortTableMemory,
    make_rig,
)

SID = 3
IOVA = 0x4000_0000


class Planted:
    """A harness machine whose RAM pKVM's ownership tracks, and an oracle over it."""

    def __init__(self, **init: object) -> None:
        self.h = harness(**init)
        self.bus = self.h.bus
        self.mp = MemProtect(self.bus, TraceBus(lambda: self.h.clock.now_ns))
        self.oracle = IsolationOracle(self.bus, [self.h.smmu], self.mp, observe=True)

    def page(self) -> int:
        return self.h.buffer(PAGE_SIZE)

    def hyp_page(self) -> int:
        pa = self.page()
        assert self.mp.host_donate_hyp(pa >> PAGE_SHIFT) == 0
        return pa

    def guest_page(self, vm: int = 7) -> int:
        pa = self.page()
        if not self.mp.vm_exists(vm):
            assert self.mp.init_vm(vm) == 0
        assert self.mp.host_donate_guest(vm, pa >> PAGE_SHIFT, pa >> PAGE_SHIFT) == 0
        return pa

    def check(self) -> list[Violation]:
        """The incremental answer, after asserting that it is the answer from scratch."""
        found = self.oracle.check()
        assert found == self.oracle.check_full()
        return found


def covering(violations: list[Violation], pa: int) -> list[Violation]:
    return [v for v in violations if v.start <= pa < v.start + v.size]


def only_pages(violations: list[Violation]) -> set[int]:
    return {pfn for v in violations for pfn in v.pfns}


# -- native: nothing to protect --------------------------------------------------------------------------
def test_native_has_nothing_to_protect() -> None:
    h = harness()
    h.write_ste(SID, h.ste_bypass())
    h.cfgi_ste(SID)
    oracle = IsolationOracle(h.bus, [h.smmu])
    assert oracle.check() == [] and oracle.check_full() == []
    assert len(oracle._evaluator.memo) == 0  # nothing was even walked


# -- stream table -------------------------------------------------------------------------------------------
def test_bypass_ste_reaches_a_hyp_page() -> None:
    p = Planted()
    hyp = p.hyp_page()
    assert p.check() == []  # every STE still invalid
    p.h.write_ste(SID, p.h.ste_bypass())
    found = p.check()
    assert [(v.sid, v.actor, v.owner, v.access) for v in found] == [(SID, "device", "hyp", "read/write")]
    assert (found[0].start, found[0].size) == (hyp, PAGE_SIZE)
    assert any("Config=BYPASS" in step for step in found[0].path)
    p.h.write_ste(SID, p.h.ste_abort())
    assert p.check() == []  # the bypass STE was never fetched, so nothing stale is cached


def test_bypass_in_a_two_level_table_names_the_l1_descriptor() -> None:
    p = Planted(two_level=True, split=6, log2size=10)
    p.hyp_page()
    p.h.write_ste(0x123, p.h.ste_bypass())
    found = p.check()
    assert {v.sid for v in found} == {0x123}
    assert any(step.startswith("L1STD[4]") for step in found[0].path)


def test_gbpa_bypass_while_disabled() -> None:
    p = Planted(enable=False)
    hyp = p.hyp_page()
    found = p.check()
    assert len(found) == 1 and found[0].sid is None and found[0].actor == "device"
    assert (found[0].start, found[0].size, found[0].owner) == (hyp, PAGE_SIZE, "hyp")
    assert "GBPA" in found[0].path[-1] and "SMMUEN=0" in found[0].path[0]
    p.h.write_reg(Reg.GBPA, GBPA.encode(ABORT=1, UPDATE=1))
    assert p.check() != []  # the update has not completed: bypass is still in effect
    p.h.clock.advance(1000)
    assert p.check() == []


def test_s2_mapping_a_guest_page() -> None:
    p = Planted()
    guest_pa = p.guest_page()
    host_pa = p.page()
    s2 = p.h.s2_table()
    map_pages(s2, IOVA, host_pa, PAGE_SIZE)
    map_pages(s2, IOVA + PAGE_SIZE, guest_pa, PAGE_SIZE)
    p.h.write_ste(SID, p.h.ste_s2(s2, vmid=1))
    found = p.check()
    assert [(v.start, v.size, v.owner, v.access) for v in found] == [
        (guest_pa, PAGE_SIZE, str(guest(7)), "read/write")
    ]
    walk = found[0].path[-1]
    assert f"stage-2 walk of {IOVA + PAGE_SIZE:#x}" in walk and f"to {guest_pa:#x}" in walk


def test_read_only_s2_mapping_is_a_read_violation() -> None:
    p = Planted()
    hyp = p.hyp_page()
    s2 = p.h.s2_table()
    map_pages(s2, IOVA, hyp, PAGE_SIZE, Prot.READ)
    p.h.write_ste(SID, p.h.ste_s2(s2, vmid=1))
    assert [v.access for v in p.check()] == ["read"]


def test_stage1_every_cd_and_both_ttbs() -> None:
    p = Planted()
    hyp_a, hyp_b = p.hyp_page(), p.hyp_page()
    h = p.h
    table = h.cd_table(4)
    pt0, pt1 = h.s1_table(), h.s1_table()
    map_pages(pt0, IOVA, hyp_a, PAGE_SIZE)
    map_pages(pt1, IOVA, hyp_b, PAGE_SIZE)
    h.write_cd(table, 0, h.cd(pt0, asid=1))
    cd = h.cd(pt0, asid=2, EPD0=1, EPD1=0, T1SZ=16, TG1=2)
    cd |= CD.TTB1.insert_address(pt1.root)
    h.write_cd(table, 3, cd)
    h.write_ste(SID, h.ste_s1(table, cdmax=2, dss=2))  # S1DSS=SSID0
    found = p.check()
    assert {(v.ssid, v.start) for v in found} == {(0, hyp_a), (3, hyp_b)}
    assert any("TTB1" in step for v in found if v.ssid == 3 for step in v.path)


def test_s1dss_bypass_is_physical_for_transactions_without_substream() -> None:
    p = Planted()
    p.hyp_page()
    h = p.h
    table = h.cd_table(2)
    h.write_ste(SID, h.ste_s1(table, cdmax=1, dss=1))  # S1DSS=BYPASS, no valid CD
    found = p.check()
    assert [(v.sid, v.ssid) for v in found] == [(SID, None)]
    assert "S1DSS=BYPASS" in found[0].path[-1]


def identity_s2(p: Planted) -> IoPageTable:
    """A stage 2 that maps each RAM page the host owns at its own address (what pKVM builds)."""
    s2 = p.h.s2_table(pages=64)
    region = p.bus.ram_regions()[0]
    blocked = sorted(pfn << PAGE_SHIFT for pfn in p.mp.host_blocked)
    cursor = region.base
    for pa in [*blocked, region.end]:
        if pa > cursor:
            map_pages(s2, cursor, cursor, pa - cursor)
        cursor = pa + PAGE_SIZE
    return s2


def test_nested_stage1_through_identity_s2_vs_host_controlled_s2() -> None:
    p = Planted()
    h = p.h
    hyp = p.hyp_page()
    s2 = identity_s2(p)
    # The host's stage 1 maps an IOVA to the hyp page's address: the identity stage 2 does not.
    s1 = h.s1_table()
    map_pages(s1, IOVA, hyp, PAGE_SIZE)
    map_pages(s1, IOVA + PAGE_SIZE, p.page(), PAGE_SIZE)
    cds = h.cd_table(1)
    h.write_cd(cds, 0, h.cd(s1, asid=1))
    h.write_ste(SID, h.ste_nested(cds, s2, vmid=0))
    assert p.check() == []
    # A stage-2-only stream whose stage 2 the host built maps the hyp page.
    host_s2 = h.s2_table()
    map_pages(host_s2, IOVA, hyp, PAGE_SIZE)
    h.write_ste(SID + 1, h.ste_s2(host_s2, vmid=1))
    found = p.check()
    assert [(v.sid, v.start) for v in found] == [(SID + 1, hyp)]


def test_nested_stage1_reaching_a_hyp_page_through_a_stage2_that_maps_it() -> None:
    p = Planted()
    h = p.h
    hyp = p.hyp_page()
    s2 = h.s2_table()
    s1 = h.s1_table()
    map_pages(s2, 0x10_0000_0000, hyp, PAGE_SIZE)
    map_pages(s1, IOVA, 0x10_0000_0000, PAGE_SIZE)
    # Stage-1 tables and the CD at IPA == PA for simplicity.
    for pa in {s1.root, *s1.table_pages()}:
        map_pages(s2, pa, pa, PAGE_SIZE)
    cds = h.cd_table(1)
    map_pages(s2, cds & ~(PAGE_SIZE - 1), cds & ~(PAGE_SIZE - 1), PAGE_SIZE)
    h.write_cd(cds, 0, h.cd(s1, asid=1))
    h.write_ste(SID, h.ste_nested(cds, s2, vmid=0))
    found = [v for v in p.check() if v.actor == "device"]
    assert found and all(v.start == hyp for v in found)
    nested = [v for v in found if v.ssid is None and any("stage-1 walk" in s for s in v.path)]
    assert nested and any(f"stage-2 walk of {0x10_0000_0000:#x}" in s for s in nested[0].path)


# -- caches ----------------------------------------------------------------------------------------------
def test_stale_tlb_entry_flagged_until_invalidated() -> None:
    p = Planted()
    h = p.h
    page = p.page()
    s2 = h.s2_table()
    map_pages(s2, IOVA, page, PAGE_SIZE)
    h.write_ste(SID, h.ste_s2(s2, vmid=5))
    ep = DmaEndpoint("ep", h.smmu, SID)
    assert ep.write(IOVA, b"cached").ok
    assert p.check() == []
    # The host unmaps without TLBI, then the page is donated: the TLB still holds the translation.
    assert s2.unmap(IOVA, PAGE_SIZE) == PAGE_SIZE
    assert p.mp.host_donate_hyp(page >> PAGE_SHIFT) == 0
    found = p.check()
    assert [(v.sid, v.start, v.size, v.owner) for v in found] == [(SID, page, PAGE_SIZE, "hyp")]
    assert found[0].path[0].startswith("TLB entry s2 VMID 5")
    assert ep.write(IOVA, b"stale!").ok  # the hardware really does it
    assert [o.pfn for o in p.oracle.observed] == [page >> PAGE_SHIFT]
    h.tlbi_s2_ipa(IOVA, vmid=5)
    assert p.check() == []


def test_stale_cached_ste_flagged_until_cfgi() -> None:
    p = Planted()
    h = p.h
    hyp = p.hyp_page()
    s2 = h.s2_table()
    map_pages(s2, IOVA, hyp, PAGE_SIZE)
    h.write_ste(SID, h.ste_s2(s2, vmid=1))
    ep = DmaEndpoint("ep", h.smmu, SID)
    ep.read(IOVA + 0x4000, 4)  # a fault, but the STE is now cached
    h.write_ste(SID, h.ste_abort())  # no CFGI_STE yet
    found = p.check()
    assert found and all(v.sid == SID and v.start == hyp for v in found)
    assert any(step.startswith("config cache: STE") for v in found for step in v.path)
    h.cfgi_ste(SID)
    assert p.check() == []


def test_stale_cached_l1std_reaches_the_old_l2() -> None:
    p = Planted(two_level=True, split=6, log2size=10)
    h = p.h
    hyp = p.hyp_page()
    h.write_ste(0x41, h.ste_abort())
    h.write_ste(0x40, h.ste_bypass())
    assert not DmaEndpoint("ep", h.smmu, 0x41).read(IOVA, 4).ok  # caches L1STD[1] (and STE 0x41)
    assert h.strtab is not None
    # The host points L1STD[1] at a new, empty L2 table without CFGI: the old L2 stays reachable.
    h.set_l1std(1, 7, h.alloc(64 * 64, 64 * 64))
    found = p.check()
    assert [(v.sid, v.start) for v in found] == [(0x40, hyp)]
    assert any(step.startswith("config cache: L1STD[1]") for step in found[0].path)
    h.cfgi_ste(0x41, leaf=False)  # Leaf=0 also drops the L1STD
    assert p.check() == []


# -- the SMMU's own accesses ----------------------------------------------------------------------------
def test_eventq_base_at_hyp_memory() -> None:
    p = Planted()
    h = p.h
    hyp = p.hyp_page()
    h.set_cr0(CR0.encode(CMDQEN=1, SMMUEN=1))  # EVENTQ_BASE is writable while the queue is off
    h.write_reg(Reg.EVENTQ_BASE, hyp | 6)
    assert p.check() == []
    h.set_cr0(CR0.encode(CMDQEN=1, EVENTQEN=1, SMMUEN=1))
    found = p.check()
    assert [(v.actor, v.sid, v.access, v.start, v.owner) for v in found] == [
        ("smmu", None, "write", hyp, "hyp")
    ]
    assert "EVENTQ_BASE" in found[0].path[-1] and found[0].stream == "the SMMU itself"


def test_stream_table_at_hyp_memory_is_a_read_violation() -> None:
    p = Planted(enable=False)
    h = p.h
    p.h.write_reg(Reg.GBPA, GBPA.encode(ABORT=1, UPDATE=1))
    h.clock.advance(1000)
    assert h.strtab is not None
    assert p.mp.host_donate_hyp(h.strtab.base >> PAGE_SHIFT) == 0
    assert p.check() == []  # SMMUEN=0: the stream table is not fetched
    h.enable()
    found = p.check()
    assert [(v.actor, v.access, v.start >> PAGE_SHIFT) for v in found] == [
        ("smmu", "read", h.strtab.base >> PAGE_SHIFT)
    ]


def test_declared_structures_may_be_read_not_written() -> None:
    h = harness()
    mp = MemProtect(h.bus, TraceBus(lambda: h.clock.now_ns))
    queue = h.buffer(PAGE_SIZE)
    assert mp.host_donate_hyp(queue >> PAGE_SHIFT) == 0

    class Declared:
        reads = ((queue, PAGE_SIZE, "hyp queue"),)
        writes: tuple[tuple[int, int, str], ...] = ()

    oracle = IsolationOracle(h.bus, [h.smmu], mp, {h.smmu.name: Declared})
    h.set_cr0(CR0.encode(CMDQEN=1, SMMUEN=1))
    h.write_reg(Reg.EVENTQ_BASE, queue | 6)
    h.set_cr0(CR0.encode(CMDQEN=1, EVENTQEN=1, SMMUEN=1))
    assert [v.access for v in oracle.check()] == ["write"]  # declared for reading only
    Declared.writes = ((queue, PAGE_SIZE, "hyp queue"),)
    assert oracle.check() == []


def test_gerror_msi_at_hyp_memory() -> None:
    p = Planted()
    h = p.h
    hyp = p.hyp_page()
    h.write_reg(Reg.GERROR_IRQ_CFG0, hyp + 0x40)
    assert p.check() == []  # not enabled: no MSI
    h.write_reg(Reg.IRQ_CTRL, IRQ_CTRL.encode(GERROR_IRQEN=1))
    found = p.check()
    assert [(v.actor, v.access, v.start, v.size) for v in found] == [("smmu", "write", hyp + 0x40, 4)]
    assert "GERROR_IRQ_CFG0" in found[0].path[-1]


def test_pending_cmd_sync_msi_at_hyp_memory() -> None:
    p = Planted()
    h = p.h
    hyp = p.hyp_page()
    sync = build_command(Opcode.SYNC, CS=SyncCs.IRQ, MSIADDR=hyp + 0x80, MSIDATA=1)
    prod = h._cmdq_prod
    h.write_mem(h.cmdq_base + prod * CMD_SIZE, sync.to_bytes(CMD_SIZE, "little"))
    h._cmdq_prod = prod + 1
    h.write_reg(Reg.CMDQ_PROD, prod + 1)  # the SMMU consumes it once modeled time passes
    found = p.check()
    assert [(v.actor, v.access, v.start, v.size) for v in found] == [("smmu", "write", hyp + 0x80, 4)]
    assert "CMD_SYNC" in found[0].path[-1]
    h.clock.advance(1000)
    assert p.check() == []
    assert [(o.purpose, o.address) for o in p.oracle.observed] == [("msi", hyp + 0x80)]


# -- ATS ----------------------------------------------------------------------------------------------
def test_atschk_zero_with_an_ats_capable_endpoint() -> None:
    p = Planted()
    hyp = p.hyp_page()
    ep = DmaEndpoint("ats", p.h.smmu, SID, ats_capable=True)
    found = p.check()
    assert [(v.sid, v.start) for v in found] == [(SID, hyp)]
    assert "ATSCHK=0" in found[0].path[0]
    assert ep.issue_translated(hyp, data=b"x").ok
    assert p.oracle.observed and p.oracle.observed[0].sid == SID
    p.h.enable(atschk=True)
    assert p.check() == []  # ATSCHK=1 and the STE does not allow ATS


def test_atschk_one_with_eats_trans() -> None:
    p = Planted(atschk=True)
    hyp = p.hyp_page()
    s2 = p.h.s2_table()
    map_pages(s2, IOVA, p.page(), PAGE_SIZE)
    p.h.write_ste(SID, p.h.ste_s2(s2, vmid=1, EATS=Eats.TRANS))
    found = p.check()
    assert [(v.sid, v.start) for v in found] == [(SID, hyp)] and "EATS=TRANS" in found[0].path[-1]


# -- incremental bookkeeping ---------------------------------------------------------------------------
def test_check_reexamines_only_what_changed() -> None:
    p = Planted()
    h = p.h
    s2 = h.s2_table()
    map_pages(s2, IOVA, p.page(), PAGE_SIZE)
    h.write_ste(SID, h.ste_s2(s2, vmid=1))
    p.hyp_page()
    assert p.oracle.check() == []
    memo = p.oracle._evaluator.memo
    before = len(memo)
    hyp = p.hyp_page()  # ownership changed: no memory was written, nothing is re-read
    assert p.oracle.check() == [] and len(memo) == before
    map_pages(s2, IOVA + PAGE_SIZE, hyp, PAGE_SIZE)  # a page-table write the bus observer sees
    assert [v.start for v in p.oracle.check()] == [hyp]


# -- the pKVM system -------------------------------------------------------------------------------------
@pytest.fixture
def rig() -> PkvmRig:
    return make_rig(probe_host=True)


def pkvm_oracle(r: PkvmRig) -> IsolationOracle:
    return IsolationOracle.for_pkvm(r.bus, [r.smmu], r.pkvm.mem_protect, r.driver, observe=True)


def test_booted_pkvm_running_its_dma_workload_has_no_violation(rig: PkvmRig) -> None:
    oracle = pkvm_oracle(rig)
    assert rig.ops is not None
    assert oracle.check() == []
    rwc = Prot.READ | Prot.WRITE | Prot.CACHE
    endpoints = []
    for sid in (0x10, 0x11, 0x345):
        dev = rig.add_master(f"ep{sid:x}", [sid])
        domain = rig.ops.domain_alloc_paging(dev)
        assert domain is not None and domain.attach_dev(dev) == 0
        assert domain.map_pages(IOVA, BUF + sid * PAGE_SIZE, PAGE_SIZE, 4, rwc) == (4 * PAGE_SIZE, 0)
        endpoints.append((DmaEndpoint(f"ep{sid:x}", rig.smmu, sid), domain))
        assert oracle.check() == []
    for ep, _ in endpoints:
        assert ep.write(IOVA + 8, b"payload").ok and ep.read(IOVA + 8, 7).data == b"payload"
    ident = rig.add_master("ident", [0x20])
    assert rig.ops.identity_domain is not None and rig.ops.identity_domain.attach_dev(ident) == 0
    assert DmaEndpoint("ident", rig.smmu, 0x20).write(BUF, b"direct").ok
    assert oracle.check() == []
    # Donations, a guest, unmaps: the identity stage 2 and the TLBs follow.
    mp = rig.pkvm.mem_protect
    spare = (BUF + 0x100_0000) >> PAGE_SHIFT
    assert mp.host_donate_hyp(spare, 4) == 0
    assert mp.init_vm(3) == 0 and mp.host_donate_guest(3, spare + 8, 0x100) == 0
    assert oracle.check() == []
    ep, domain = endpoints[0]
    gather = IotlbGather()
    assert domain.unmap_pages(IOVA, PAGE_SIZE, 4, gather) == 4 * PAGE_SIZE
    domain.iotlb_sync(gather)
    assert not ep.write(IOVA, b"gone").ok
    assert oracle.check() == [] and oracle.check_full() == []
    assert oracle.observed == []


def test_pkvm_donating_a_page_the_host_dma_maps_leaves_nothing_reachable(rig: PkvmRig) -> None:
    oracle = pkvm_oracle(rig)
    assert rig.ops is not None
    dev = rig.add_master("ep", [0x10])
    domain = rig.ops.domain_alloc_paging(dev)
    assert domain is not None and domain.attach_dev(dev) == 0
    target = BUF + 0x50_0000
    assert domain.map_pages(IOVA, target, PAGE_SIZE, 1, Prot.READ | Prot.WRITE) == (PAGE_SIZE, 0)
    ep = DmaEndpoint("ep", rig.smmu, 0x10)
    assert ep.write(IOVA, b"before").ok  # translations for the page are now cached
    assert rig.pkvm.mem_protect.host_donate_hyp(target >> PAGE_SHIFT) == 0
    assert oracle.check() == []  # the hyp unmapped it from the identity stage 2 and invalidated
    assert not ep.write(IOVA, b"after").ok
    assert oracle.observed == []


def test_pkvm_v4_copies_a_nested_host_ste_verbatim() -> None:
    """The host asks for nesting with a stage 2 of its own: v4 installs the STE as it is."""
    r = make_rig()  # the host programs the SMMU by hand
    oracle = pkvm_oracle(r)
    queue = HostQueue(r)
    table = HostStreamTable(r, queue)
    table.set_l2(0, HOST_L2)
    table.enable()
    hyp = r.hyp.strtab_base  # a page of the shadow stream table
    memory = PortTableMemory(r.host_cpu)
    config = PageTableConfig(stage=2, granule=GRANULES[PAGE_SIZE], ias=40, oas=40)
    s2 = IoPageTable(config, memory, RangePageAllocator(BUF, 64 * PAGE_SIZE, PAGE_SIZE, memory=memory))
    map_pages(s2, IOVA, hyp, PAGE_SIZE, RW)
    nested = STE.encode(V=1, CONFIG=SteConfig.NESTED, S1CDMAX=1, S1DSS=S1Dss.BYPASS)
    table.write_ste(
        SID, nested | STE.S1CONTEXTPTR.insert_address(BUF + 0x10_0000) | SmmuHarness.s2_fields(s2, 9)
    )
    found = [v for v in oracle.check() if v.actor == "device"]
    assert [(v.sid, v.start, v.owner) for v in found] == [(SID, hyp, "hyp")]
    assert any("Config=NESTED" in step for step in found[0].path)
    assert "S1DSS=BYPASS" in found[0].path[-2]


def test_pkvm_host_points_eventq_at_hyp_memory(rig: PkvmRig) -> None:
    oracle = pkvm_oracle(rig)
    hyp = rig.hyp.strtab_base
    cr0 = rig.hyp.cr0
    rig.host_write(Reg.CR0, cr0 & ~CR0.EVENTQEN.in_place_mask)
    rig.clock.advance(1000)
    rig.host_write(Reg.EVENTQ_BASE, hyp | 4, 8)  # v4 passes EVENTQ_BASE through
    rig.host_write(Reg.CR0, cr0)
    rig.clock.advance(1000)
    found = oracle.check()
    assert [(v.actor, v.access, v.owner) for v in found] == [("smmu", "write", "hyp")]
    assert found[0].start == hyp
    assert oracle.observed == []  # the SMMU reads the shadow stream table: declared
    assert not DmaEndpoint("ep", rig.smmu, 0x77).read(IOVA, 4).ok  # an event record
    assert [(o.purpose, o.is_write, o.pfn) for o in oracle.observed] == [
        ("evtq-write", True, hyp >> PAGE_SHIFT)
    ]
