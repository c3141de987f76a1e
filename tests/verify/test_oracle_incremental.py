"""``check()`` after each step equals ``check_full()``: random steps on a hand-programmed SMMU
(stream table entries, CDs, page tables, caches, invalidations, registers, ownership, DMA) and on
the pKVM system (driver operations, DMA, donations, host register writes)."""

from __future__ import annotations

import os
import sys
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkvm_smmu.arch.commands import Opcode, build_command, cfgi_all
from pkvm_smmu.arch.registers import CR0, GBPA, IRQ_CTRL, Reg
from pkvm_smmu.arch.strtab import Eats
from pkvm_smmu.hyp.mem_protect import MemProtect
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.pgtable import IoPageTable, Prot
from pkvm_smmu.trace import TraceBus
from pkvm_smmu.verify.oracle import IsolationOracle

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "machine", "smmu"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "hyp", "smmuv3"))
from harness import harness
from hyp_smmu_rig import BUF, make_rig

SIDS = (0x01, 0x02, 0x41, 0x42)  # two L2 tables (split 6)
SLOTS = 6
PAGES = 8
IOVA = 0x4000_0000
NESTED_IPA = 0x10_0000_0000


class System:
    """A harness SMMU with prepared tables the steps rearrange."""

    def __init__(self) -> None:
        h = self.h = harness(two_level=True, split=6, log2size=8)
        self.mp = MemProtect(h.bus, TraceBus(lambda: h.clock.now_ns))
        self.pages = [h.buffer(PAGE_SIZE) for _ in range(PAGES)]
        self.s1 = h.s1_table(pages=32)
        self.s2 = [h.s2_table(pages=32), h.s2_table(pages=32)]
        # The nested stream's stage 2 maps its stage-1 tables and CD table at IPA == PA.
        self.cds = h.cd_table(4)
        for table in (self.s2[1],):
            table.map(self.cds, self.cds, PAGE_SIZE, Prot.READ | Prot.WRITE)
        self.tables: list[IoPageTable] = [self.s1, *self.s2]
        self.mapped: set[tuple[int, int]] = set()
        self.spare_l2 = h.alloc(64 * 64, 64 * 64)
        self.endpoints = {
            sid: DmaEndpoint(f"ep{sid:x}", h.smmu, sid, ats_capable=sid == 0x42) for sid in SIDS
        }
        for sid in SIDS:
            h.write_ste(sid, h.ste_abort())
        # Start deep: every table maps a few pages, two CDs are valid, two pages are the hyp's,
        # and stage 1 also maps the IPA the nested stream's stage 2 can be pointed around with.
        for table in range(3):
            for slot in range(3):
                self.step(("map", table, slot, slot))
        self.s1.map(IOVA + 5 * PAGE_SIZE, NESTED_IPA, PAGE_SIZE, Prot.READ | Prot.WRITE)
        self.step(("s2-ipa", 0))
        self.step(("cd", 0, True))
        self.step(("cd", 1, True))
        for page in (0, 1):
            self.step(("own", page, True))
        self.oracle = IsolationOracle(h.bus, [h.smmu], self.mp)

    def ste(self, kind: str) -> int:
        h = self.h
        if kind == "invalid":
            return 0
        if kind == "abort":
            return h.ste_abort()
        if kind == "bypass":
            return h.ste_bypass()
        if kind == "s1":
            return h.ste_s1(self.cds, cdmax=2, dss=2)
        if kind == "s1-dss-bypass":
            return h.ste_s1(self.cds, cdmax=2, dss=1)
        if kind == "s2":
            return h.ste_s2(self.s2[0], vmid=1)
        if kind == "s2-eats":
            return h.ste_s2(self.s2[0], vmid=1, EATS=Eats.TRANS)
        return h.ste_nested(self.cds, self.s2[1], vmid=2)

    def step(self, action: tuple[Any, ...]) -> None:
        h = self.h
        kind = action[0]
        if kind == "ste":
            _, sid, ste = action
            h.write_ste(sid, self.ste(ste))
        elif kind == "cd":
            _, index, valid = action
            h.write_cd(self.cds, index, h.cd(self.s1, asid=index + 1) if valid else 0)
        elif kind == "map":
            _, table, slot, page = action
            if (table, slot) not in self.mapped:
                self.tables[table].map(
                    IOVA + slot * PAGE_SIZE, self.pages[page], PAGE_SIZE, Prot.READ | Prot.WRITE
                )
                if table == 0:  # the nested stream's stage 2 must map the stage-1 tables
                    for pa in self.s1.table_pages():
                        if self.s2[1].iova_to_phys(pa) is None:
                            self.s2[1].map(pa, pa, PAGE_SIZE, Prot.READ | Prot.WRITE)
                self.mapped.add((table, slot))
        elif kind == "unmap":
            _, table, slot = action
            if (table, slot) in self.mapped:
                self.tables[table].unmap(IOVA + slot * PAGE_SIZE, PAGE_SIZE)
                self.mapped.discard((table, slot))
        elif kind == "s2-ipa":
            _, page = action
            if self.s2[1].iova_to_phys(NESTED_IPA) is not None:
                self.s2[1].unmap(NESTED_IPA, PAGE_SIZE)
            self.s2[1].map(NESTED_IPA, self.pages[page], PAGE_SIZE, Prot.READ | Prot.WRITE)
        elif kind == "dma":
            _, sid, slot, ssid, write = action
            ep = self.endpoints[sid]
            address = IOVA + slot * PAGE_SIZE
            if write:
                ep.write(address, b"dma", ssid=ssid)
            else:
                ep.read(address, 8, ssid=ssid)
        elif kind == "ats":
            _, page = action
            self.endpoints[0x42].issue_translated(self.pages[page], data=b"ats")
        elif kind == "command":
            _, which, sid = action
            commands = {
                "cfgi-ste": build_command(Opcode.CFGI_STE, SID=sid, LEAF=1),
                "cfgi-l1": build_command(Opcode.CFGI_STE, SID=sid, LEAF=0),
                "cfgi-all": cfgi_all(),
                "cfgi-cd": build_command(Opcode.CFGI_CD_ALL, SID=sid),
                "tlbi-nh": build_command(Opcode.TLBI_NH_ALL, VMID=2),
                "tlbi-s2": build_command(Opcode.TLBI_S12_VMALL, VMID=1),
                "tlbi-nsnh": build_command(Opcode.TLBI_NSNH_ALL),
            }
            h.submit(commands[which])
        elif kind == "l1":
            _, index, spare = action
            assert h.strtab is not None
            h.set_l1std(index, 7, self.spare_l2 if spare else h.strtab.l2.get(index, self.spare_l2))
        elif kind == "own":
            _, page, donate = action
            pfn = self.pages[page] >> PAGE_SHIFT
            if donate:
                self.mp.host_donate_hyp(pfn)
            else:
                self.mp.hyp_donate_host(pfn)
        elif kind == "register":
            _, which, page = action
            self._register(which, self.pages[page])
        elif kind == "time":
            h.clock.advance(action[1])

    def _register(self, which: str, pa: int) -> None:
        h = self.h
        cr0 = h.read_reg(Reg.CR0)
        if which == "smmuen":
            h.write_reg(Reg.CR0, cr0 ^ CR0.SMMUEN.in_place_mask)  # the ACK follows later
        elif which == "atschk":
            h.write_reg(Reg.CR0, cr0 ^ CR0.ATSCHK.in_place_mask)
        elif which == "gbpa":
            abort = GBPA.ABORT.in_place_mask
            h.write_reg(Reg.GBPA, (h.read_reg(Reg.GBPA) & abort ^ abort) | GBPA.UPDATE.in_place_mask)
        elif which == "eventq":
            h.write_reg(Reg.CR0, cr0 & ~CR0.EVENTQEN.in_place_mask)
            h.clock.advance(1000)
            h.write_reg(Reg.EVENTQ_BASE, pa | 4)
            h.write_reg(Reg.CR0, cr0 | CR0.EVENTQEN.in_place_mask)
        elif which == "msi":
            h.write_reg(Reg.IRQ_CTRL, 0)
            h.clock.advance(1000)
            h.write_reg(Reg.GERROR_IRQ_CFG0, pa + 0x10)
            h.write_reg(Reg.IRQ_CTRL, IRQ_CTRL.encode(GERROR_IRQEN=1))


SID_ = st.sampled_from(SIDS)
PAGE = st.integers(0, PAGES - 1)
SLOT = st.integers(0, SLOTS - 1)
ACTIONS = st.one_of(
    st.tuples(st.just("ste"), SID_, st.sampled_from(
        ["invalid", "abort", "bypass", "s1", "s1-dss-bypass", "s2", "s2-eats", "nested"]
    )),
    st.tuples(st.just("cd"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("map"), st.integers(0, 2), SLOT, PAGE),
    st.tuples(st.just("unmap"), st.integers(0, 2), SLOT),
    st.tuples(st.just("s2-ipa"), PAGE),
    st.tuples(st.just("dma"), SID_, SLOT, st.sampled_from([None, 0, 1, 3]), st.booleans()),
    st.tuples(st.just("ats"), PAGE),
    st.tuples(st.just("command"), st.sampled_from(
        ["cfgi-ste", "cfgi-l1", "cfgi-all", "cfgi-cd", "tlbi-nh", "tlbi-s2", "tlbi-nsnh"]
    ), SID_),
    st.tuples(st.just("l1"), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("own"), PAGE, st.booleans()),
    st.tuples(st.just("register"), st.sampled_from(["smmuen", "atschk", "gbpa", "eventq", "msi"]), PAGE),
    st.tuples(st.just("time"), st.sampled_from([10, 1000])),
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, min_size=1, max_size=30))
def test_incremental_equals_full_on_a_hand_programmed_smmu(actions: list[tuple[Any, ...]]) -> None:
    system = System()
    assert system.oracle.check() == system.oracle.check_full()
    for action in actions:
        system.step(action)
        assert system.oracle.check() == system.oracle.check_full(), action


def test_the_random_steps_reach_violations() -> None:
    """The start state and the step vocabulary do produce violations, through tables and caches
    (so the property above compares something)."""
    system = System()
    for action in [("ste", 0x01, "s2"), ("dma", 0x01, 0, None, True), ("unmap", 1, 0)]:
        system.step(action)
    found = {(v.sid, v.start): v.path for v in system.oracle.check()}
    page0, page1 = system.pages[0], system.pages[1]
    assert found[(0x01, page0)][0].startswith("TLB entry")  # unmapped, still cached
    assert "stage 2 only" in found[(0x01, page1)]  # still mapped
    assert "ATSCHK=0" in found[(0x42, page0)][0]


# -- the pKVM system -----------------------------------------------------------------------------------
PKVM_SIDS = (0x10, 0x11, 0x145)
PKVM_ACTIONS = st.one_of(
    st.tuples(
        st.just("attach"), st.sampled_from(PKVM_SIDS), st.sampled_from(["paging", "identity", "blocked"])
    ),
    st.tuples(st.just("map"), st.sampled_from(PKVM_SIDS), st.integers(0, 3), st.integers(0, 7)),
    st.tuples(st.just("unmap"), st.sampled_from(PKVM_SIDS), st.integers(0, 3)),
    st.tuples(st.just("dma"), st.sampled_from(PKVM_SIDS), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("own"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("register"), st.sampled_from(["eventq", "msi", "gbpa"]), st.integers(0, 7)),
)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PKVM_ACTIONS, min_size=1, max_size=15))
def test_incremental_equals_full_on_the_pkvm_system(actions: list[tuple[Any, ...]]) -> None:
    from pkvm_smmu.pgtable.gather import IotlbGather

    r = make_rig(probe_host=True)
    assert r.ops is not None
    oracle = IsolationOracle.for_pkvm(r.bus, [r.smmu], r.pkvm.mem_protect, r.driver)
    pages = [BUF + 0x10_0000 + i * PAGE_SIZE for i in range(8)]
    devices = {sid: r.add_master(f"ep{sid:x}", [sid]) for sid in PKVM_SIDS}
    domains: dict[int, Any] = {}
    mapped: set[tuple[int, int]] = set()
    donated: set[int] = set()
    for action in actions:
        kind, *args = action
        if kind == "attach":
            sid, what = args
            dev = devices[sid]
            if what == "paging":
                domain = r.ops.domain_alloc_paging(dev)
                if domain is not None and domain.attach_dev(dev) == 0:
                    domains[sid] = domain
                    mapped = {m for m in mapped if m[0] != sid}
            else:
                target = r.ops.identity_domain if what == "identity" else r.ops.blocked_domain
                assert target is not None
                target.attach_dev(dev)
                domains.pop(sid, None)
        elif kind == "map":
            sid, slot, page = args
            if sid in domains and (sid, slot) not in mapped and page not in donated:
                domains[sid].map_pages(
                    0x1000_0000 + slot * PAGE_SIZE, pages[page], PAGE_SIZE, 1, Prot.READ | Prot.WRITE
                )
                mapped.add((sid, slot))
        elif kind == "unmap":
            sid, slot = args
            if sid in domains and (sid, slot) in mapped:
                gather = IotlbGather()
                domains[sid].unmap_pages(0x1000_0000 + slot * PAGE_SIZE, PAGE_SIZE, 1, gather)
                domains[sid].iotlb_sync(gather)
                mapped.discard((sid, slot))
        elif kind == "dma":
            sid, slot, write = args
            ep = DmaEndpoint("ep", r.smmu, sid)
            address = 0x1000_0000 + slot * PAGE_SIZE
            if write:
                ep.write(address, b"x")
            else:
                ep.read(address, 4)
        elif kind == "own":
            page, donate = args
            pfn = pages[page] >> PAGE_SHIFT
            mp = r.pkvm.mem_protect
            if donate and mp.host_donate_hyp(pfn) == 0:
                donated.add(page)
            elif not donate and mp.hyp_donate_host(pfn) == 0:
                donated.discard(page)
        elif kind == "register":
            which, page = args
            cr0 = r.hyp.cr0
            if which == "eventq":
                r.host_write(Reg.CR0, cr0 & ~CR0.EVENTQEN.in_place_mask)
                r.clock.advance(1000)
                r.host_write(Reg.EVENTQ_BASE, pages[page] | 4, 8)
                r.host_write(Reg.CR0, cr0)
            elif which == "msi":
                r.host_write(Reg.GERROR_IRQ_CFG0, pages[page] + 0x20, 8)
                r.host_write(Reg.IRQ_CTRL, IRQ_CTRL.encode(GERROR_IRQEN=1))
            else:
                r.host_write(Reg.GBPA, GBPA.encode(UPDATE=1))  # emulated: the SMMU stays ABORT
            r.clock.advance(1000)
        assert oracle.check() == oracle.check_full(), action
