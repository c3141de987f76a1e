"""Domains on the SmmuV3 model beyond the basics: nested (guest stage 1 over a stage-2 parent), ATS
masters (EATS, ATC invalidation after the TLBI), two-level CD tables, batches and queue wrap."""

from __future__ import annotations

import errno
import os
import sys

from pkvm_smmu.arch.commands import Opcode, build_command
from pkvm_smmu.arch.registers import Reg
from pkvm_smmu.arch.strtab import CD, L1CD, STE, Eats, S1Dss, S1Fmt, SteConfig
from pkvm_smmu.arch.vmsa import GRANULES
from pkvm_smmu.host.arm_smmu_v3.cd import make_s1_cd
from pkvm_smmu.host.arm_smmu_v3.domain import ArmSmmuDomain, ArmSmmuNestedDomain
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.smmu import SmmuFeatures
from pkvm_smmu.pgtable import IoPageTable, PageTableConfig, RangePageAllocator
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.memory import Buffer
from pkvm_smmu.pgtable.prot import Prot

sys.path.insert(0, os.path.dirname(__file__))
from armsmmu_rig import RAM_BASE, PortTableMemory, Rig, make_rig

RW = Prot.READ | Prot.WRITE | Prot.CACHE
IOVA = 0x2000_0000
BUF = RAM_BASE + 0x0200_0000


def commands(r: Rig) -> list[str]:
    return [e.fields["command"] for e in r.events("cmdq.issue")]


# -- nested ---------------------------------------------------------------------------------------

GUEST_PA = RAM_BASE + 0x0400_0000  # the guest's RAM
GUEST_IPA = 0x4000_0000
GUEST_PAGES = 64
GUEST_DATA_IPA = GUEST_IPA + 0x3_0000  # a guest page the device writes to


class GuestMemory:
    """The guest's view: IPAs translated by the parent domain, accessed through the CPU port."""

    def __init__(self, inner: PortTableMemory, parent: ArmSmmuDomain) -> None:
        self.inner = inner
        self.parent = parent

    def pa(self, ipa: int) -> int:
        pa = self.parent.iova_to_phys(ipa)
        assert pa, f"IPA {ipa:#x} not mapped"
        return pa

    def read_u64(self, pa: int) -> int:
        return self.inner.read_u64(self.pa(pa))

    def write_u64(self, pa: int, value: int) -> None:
        self.inner.write_u64(self.pa(pa), value)

    def read_table(self, pa: int, length: int) -> bytes:
        return self.inner.read_table(self.pa(pa), length)

    def write_table(self, pa: int, data: Buffer) -> None:
        self.inner.write_table(self.pa(pa), data)

    def zero_page(self, pa: int, size: int = 4096) -> None:
        self.inner.zero_page(self.pa(pa), size)


def test_nested_domain_translates_guest_stage1_through_the_parent() -> None:
    r = make_rig()
    assert r.ops is not None
    dev = r.add_master("vf0", [0x30])
    parent = r.ops.domain_alloc_paging_flags(dev, nest_parent=True)
    assert isinstance(parent, ArmSmmuDomain) and parent.stage == ArmSmmuDomain.STAGE2
    assert parent.map_pages(GUEST_IPA, GUEST_PA, 4096, GUEST_PAGES, RW) == (GUEST_PAGES * 4096, 0)

    # The guest builds its stage 1 and CD in its own memory (IPAs).
    gmem = GuestMemory(PortTableMemory(r.cpu), parent)
    galloc = RangePageAllocator(GUEST_IPA + 0x1_0000, 0x1_0000, 4096, memory=gmem)
    gs1 = IoPageTable(PageTableConfig(stage=1, granule=GRANULES[4096], ias=48, oas=48), gmem, galloc)
    assert gs1.map(0x10_0000, GUEST_DATA_IPA, 4096, RW).error == 0
    cd_ipa = GUEST_IPA
    gmem.write_table(cd_ipa, CD.to_bytes(make_s1_cd(7, gs1.config, gs1.root)))
    vste = STE.encode(V=1, CONFIG=SteConfig.S1_TRANS, S1DSS=S1Dss.SSID0, S1CIR=1, S1COR=1, S1CSH=3)
    vste |= STE.S1CONTEXTPTR.insert_address(cd_ipa)

    nested = r.ops.domain_alloc_nested(parent, vste)
    assert isinstance(nested, ArmSmmuNestedDomain)
    assert nested.attach_dev(dev) == 0
    ste = r.ste(0x30)
    assert STE.CONFIG.get(ste) == SteConfig.NESTED and STE.S2VMID.get(ste) == parent.vmid
    assert STE.S1CONTEXTPTR.get_address(ste) == cd_ipa and STE.MEV.get(ste)

    ep = DmaEndpoint("vf0", r.smmu, 0x30)
    assert ep.write(0x10_0040, b"nested").ok
    assert r.bus.read_bytes(0, GUEST_PA + 0x3_0040, 6) == b"nested"  # type: ignore[arg-type]

    # Unmapping at stage 2 invalidates the IPA and the guest's combined entries (NH_ALL by VMID).
    gather = IotlbGather()
    parent.unmap_pages(GUEST_DATA_IPA, 4096, 1, gather)
    r.sink.clear()
    parent.iotlb_sync(gather)
    cmds = commands(r)
    assert any(c.startswith("CMD_TLBI_S2_IPA") for c in cmds)
    assert any(c.startswith("CMD_TLBI_NH_ALL") and f"VMID={parent.vmid}" in c for c in cmds)
    assert not ep.write(0x10_0040, b"x").ok


def test_nested_domain_checks_the_vste() -> None:
    r = make_rig()
    assert r.ops is not None
    dev = r.add_master("vf0", [0x30])
    plain = r.ops.domain_alloc_paging(dev)
    parent = r.ops.domain_alloc_paging_flags(dev, nest_parent=True)
    assert isinstance(plain, ArmSmmuDomain) and isinstance(parent, ArmSmmuDomain)
    s1 = STE.encode(V=1, CONFIG=SteConfig.S1_TRANS)
    assert r.ops.domain_alloc_nested(plain, s1) == -errno.EINVAL  # not a nesting parent
    assert r.ops.domain_alloc_nested(parent, s1 | STE.S2VMID.insert(5)) == -errno.EIO  # not the guest's
    assert r.ops.domain_alloc_nested(parent, STE.encode(V=1, CONFIG=SteConfig.NESTED)) == -errno.EIO
    # A vSTE asking for bypass gets the parent's stage 2 alone.
    bypass = r.ops.domain_alloc_nested(parent, STE.encode(V=1, CONFIG=SteConfig.BYPASS))
    assert isinstance(bypass, ArmSmmuNestedDomain) and bypass.attach_dev(dev) == 0
    assert STE.CONFIG.get(r.ste(0x30)) == SteConfig.S2_TRANS


def test_no_nesting_without_both_stages() -> None:
    r = make_rig(SmmuFeatures(cmdq_log2_max=8, eventq_log2_max=7, stage2=False))
    assert r.ops is not None
    dev = r.add_master("vf0", [0x30])
    assert r.ops.domain_alloc_paging_flags(dev, nest_parent=True) == -errno.EOPNOTSUPP


# -- ATS ------------------------------------------------------------------------------------------


def test_ats_master_gets_eats_and_atc_invalidation_after_the_tlbi() -> None:
    r = make_rig()
    assert r.ops is not None
    dev = r.add_master("nic0", [0x40], ats_supported=True)
    ep = DmaEndpoint("nic0", r.smmu, 0x40, ats_capable=True)
    dom = r.ops.domain_alloc_paging(dev)
    assert isinstance(dom, ArmSmmuDomain)
    r.sink.clear()
    assert dom.attach_dev(dev) == 0
    assert STE.EATS.get(r.ste(0x40)) == Eats.TRANS
    assert dev.ats_calls == ["enable:12"]
    # The whole ATC is invalidated before ATS is enabled at the device.
    assert any(c.startswith("CMD_ATC_INV") and "SIZE=0x34" in c for c in commands(r))

    assert dom.map_pages(IOVA, BUF, 4096, 1, RW) == (4096, 0)
    assert ep.ats_write(IOVA + 16, b"ats").ok
    assert r.bus.read_bytes(0, BUF + 16, 3) == b"ats"  # type: ignore[arg-type]
    assert ep.atc_entries

    gather = IotlbGather()
    dom.unmap_pages(IOVA, 4096, 1, gather)
    r.sink.clear()
    dom.iotlb_sync(gather)
    cmds = [c.split("(")[0] for c in commands(r)]
    # TLBI, SYNC, then ATC_INV, SYNC: the ATC may only be invalidated once the TLB is.
    assert cmds == ["CMD_TLBI_NH_VA", "CMD_SYNC", "CMD_ATC_INV", "CMD_SYNC"]
    assert not ep.atc_entries
    assert not ep.ats_write(IOVA + 16, b"late").ok


def test_ats_switched_off_when_moving_to_identity() -> None:
    r = make_rig()
    assert r.ops is not None and r.ops.identity_domain is not None
    dev = r.add_master("nic0", [0x40], ats_supported=True)
    dom = r.ops.domain_alloc_paging(dev)
    assert isinstance(dom, ArmSmmuDomain) and dom.attach_dev(dev) == 0
    assert r.ops.identity_domain.attach_dev(dev) == 0
    assert dev.ats_calls == ["enable:12", "disable"]
    assert STE.CONFIG.get(r.ste(0x40)) == SteConfig.BYPASS and STE.EATS.get(r.ste(0x40)) == 0
    assert dom.nr_ats_masters == 0 and dom.master_domains == []


# -- CD tables ------------------------------------------------------------------------------------


def test_two_level_cd_table_for_a_pasid_capable_master() -> None:
    r = make_rig()
    assert r.ops is not None
    dev = r.add_master("acc0", [0x50], pasid_num_bits=16)
    dom = r.ops.domain_alloc_paging(dev)
    assert isinstance(dom, ArmSmmuDomain) and dom.attach_dev(dev) == 0
    ste = r.ste(0x50)
    assert STE.S1FMT.get(ste) == S1Fmt.TWO_LEVEL_64K and STE.S1CDMAX.get(ste) == 16
    l1 = r.cpu.read(STE.S1CONTEXTPTR.get_address(ste), 8)
    assert isinstance(l1, int) and L1CD.V.get(l1)
    cd = CD.from_bytes(r.bus.read_bytes(0, L1CD.L2PTR.get_address(l1), 64))  # type: ignore[arg-type]
    assert CD.V.get(cd) and CD.ASID.get(cd) == dom.asid
    # The leaf was published with CFGI_CD(leaf=0) before the CD was written.
    cfgi = [c for c in commands(r) if c.startswith("CMD_CFGI_CD")]
    assert "LEAF" not in cfgi[0] and "LEAF=1" in cfgi[-1]
    ep = DmaEndpoint("acc0", r.smmu, 0x50)
    assert dom.map_pages(IOVA, BUF, 4096, 1, RW) == (4096, 0)
    assert ep.write(IOVA, b"cd2l").ok


def test_switching_s1_domains_rewrites_only_the_cd() -> None:
    r = make_rig()
    assert r.ops is not None
    dev = r.add_master("ep", [0x60])
    a, b = r.ops.domain_alloc_paging(dev), r.ops.domain_alloc_paging(dev)
    assert isinstance(a, ArmSmmuDomain) and isinstance(b, ArmSmmuDomain)
    assert a.attach_dev(dev) == 0
    ste = r.ste(0x60)
    r.sink.clear()
    assert b.attach_dev(dev) == 0
    assert r.ste(0x60) == ste  # same CD table, same STE
    assert not any(c.startswith("CMD_CFGI_STE(") for c in commands(r))
    # New ASID (word 0) and TTB0 (word 1): the CD goes through V=0, three CFGI_CD rounds.
    assert len([c for c in commands(r) if c.startswith("CMD_CFGI_CD")]) == 3
    assert b.master_domains and not a.master_domains


def test_s2_attach_refused_while_pasids_are_in_use() -> None:
    r = make_rig(SmmuFeatures(cmdq_log2_max=8, eventq_log2_max=7))
    assert r.ops is not None
    dev = r.add_master("ep", [0x61], pasid_num_bits=4)
    master = r.ops.master_of(dev)
    assert master is not None
    master.cd_table.used_ssids = 1  # as if a PASID were attached (SVA is not modeled)
    s2 = r.ops.domain_alloc_paging_flags(dev, nest_parent=True)
    assert isinstance(s2, ArmSmmuDomain) and s2.attach_dev(dev) == -errno.EBUSY


# -- queue ----------------------------------------------------------------------------------------


def test_batches_split_and_the_queue_wraps() -> None:
    r = make_rig(SmmuFeatures(cmdq_log2_max=7, eventq_log2_max=7, ril=False))  # 128 entries
    cmdq = r.dev.cmdq
    assert cmdq is not None
    batch = cmdq.batch()
    for i in range(100):  # more than one batch (64) of commands, one CMD_SYNC at the end
        batch.add(build_command(Opcode.TLBI_NH_ASID, ASID=i))
    assert batch.submit() == 0
    syncs = [c for c in commands(r) if c.startswith("CMD_SYNC")]
    assert len(syncs) == 3 + 1  # three from the reset, one for the batch
    for _ in range(150):  # around the 128-entry queue more than once
        assert cmdq.issue_cmd_with_sync(build_command(Opcode.TLBI_NSNH_ALL)) == 0
    prod = r.reg(Reg.CMDQ_PROD)
    assert prod == cmdq.q.prod and r.reg(Reg.CMDQ_CONS) & 0xFF == prod & 0xFF
    assert prod >> 7 & 1 == (6 + 101 + 300) >> 7 & 1  # the wrap bit moved with every pass
