"""The host's unmodified arm-smmu-v3 driver on the SMMU the hyp emulates: probe, domains, DMA through
nested translation, invalidation, events; and what the trace lets a report count."""

from __future__ import annotations

import os
import sys

import pytest

from pkvm_smmu.arch.commands import Opcode
from pkvm_smmu.arch.registers import GBPA, Reg
from pkvm_smmu.arch.strtab import STE, SteConfig
from pkvm_smmu.host.arm_smmu_v3.domain import ArmSmmuDomain
from pkvm_smmu.host.arm_smmu_v3.features import Feat, Opt
from pkvm_smmu.machine.cpu import CpuFault
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.prot import Prot

sys.path.insert(0, os.path.dirname(__file__))
from hyp_smmu_rig import BUF, PkvmRig, make_rig

SID = 0x10
IOVA = 0x1000_0000
RWC = Prot.READ | Prot.WRITE | Prot.CACHE


@pytest.fixture
def r() -> PkvmRig:
    return make_rig(probe_host=True)


def stage1(r: PkvmRig, sid: int = SID) -> tuple[ArmSmmuDomain, DmaEndpoint]:
    assert r.ops is not None
    dev = r.add_master(f"ep{sid:x}", [sid])
    dom = r.ops.domain_alloc_paging(dev)
    assert isinstance(dom, ArmSmmuDomain) and dom.attach_dev(dev) == 0
    return dom, DmaEndpoint(f"ep{sid:x}", r.smmu, sid)


def test_probe_sees_an_smmu_without_stage2_msi_or_el2(r: PkvmRig) -> None:
    dev = r.dev
    assert dev is not None and dev.probed
    for hidden in (Feat.MSI, Feat.TRANS_S2, Feat.HYP, Feat.NESTING):
        assert not dev.features & hidden
    assert dev.features & Feat.TRANS_S1 and dev.features & Feat.TWO_LVL_STRTAB
    assert dev.vmid_bits == 8 and not dev.options & Opt.MSIPOLL
    assert r.warnings() == []  # Linux's probe stays inside what v4 emulates
    # The host's reset completed against emulated registers; the SMMU itself is enabled on the
    # hyp's shadows and stays ABORT for GBPA.
    assert r.hyp.smmu_enabled and r.hyp.cmdq_enabled
    assert r.host_read(Reg.GBPA) == GBPA.ABORT.in_place_mask  # what the host wrote (disable_bypass)
    assert r.hw_reg(Reg.GBPA) == GBPA.ABORT.in_place_mask
    assert r.hw_reg(Reg.STRTAB_BASE, 8) != r.host_read(Reg.STRTAB_BASE, 8)


def test_sync_completion_by_cons_not_msi(r: PkvmRig) -> None:
    syncs = [c for c in r.consumed() if c.startswith("CMD_SYNC")]
    assert syncs and all("CS=SEV" in c for c in syncs)
    assert r.counters.get("hyp.smmuv3", "cmd.rewrite") == 0


def test_stage1_dma_goes_through_nested_translation(r: PkvmRig) -> None:
    dom, ep = stage1(r)
    shadow = r.shadow_ste(SID)
    idmap = r.iommu.idmap
    assert idmap is not None
    assert STE.CONFIG.get(shadow) == SteConfig.NESTED
    assert STE.S2TTB.get_address(shadow) == idmap.root and STE.S2VMID.get(shadow) == 0
    host_ste = r.dev.read_ste(SID) if r.dev is not None else 0
    assert STE.CONFIG.get(host_ste) == SteConfig.S1_TRANS  # the host's view is untouched
    assert dom.map_pages(IOVA, BUF, 4096, 2, RWC) == (8192, 0)
    data = bytes(range(100, 200))
    assert ep.write(IOVA + 0x1010, data).ok
    assert r.ram(BUF + 0x1010, len(data)) == data
    assert ep.read(IOVA + 0x1010, len(data)).data == data


def test_host_unmap_and_tlbi_reach_the_smmu(r: PkvmRig) -> None:
    dom, ep = stage1(r)
    assert dom.map_pages(IOVA, BUF, 4096, 1, RWC) == (4096, 0)
    assert ep.write(IOVA, b"one").ok
    gather = IotlbGather()
    assert dom.unmap_pages(IOVA, 4096, 1, gather) == 4096
    r.sink.clear()
    dom.iotlb_sync(gather)
    assert any(c.startswith("CMD_TLBI_NH_VA") for c in r.consumed())
    assert not ep.write(IOVA, b"two").ok
    events = r.events("arm-smmu-v3.smmu0", "evtq.event")  # the host's event queue handling, passed through
    assert events and events[-1].fields["event"] == "F_TRANSLATION" and events[-1].fields["sid"] == SID


def test_identity_and_blocked_domains(r: PkvmRig) -> None:
    assert r.ops is not None and r.ops.identity_domain is not None and r.ops.blocked_domain is not None
    dev = r.add_master("ep0", [SID])
    ep = DmaEndpoint("ep0", r.smmu, SID)
    assert not ep.write(BUF, b"x").ok  # abort from the start
    assert r.ops.identity_domain.attach_dev(dev) == 0
    assert STE.CONFIG.get(r.shadow_ste(SID)) == SteConfig.S2_TRANS
    assert ep.write(BUF, b"ident").ok and r.ram(BUF, 5) == b"ident"
    assert r.ops.blocked_domain.attach_dev(dev) == 0
    assert STE.CONFIG.get(r.shadow_ste(SID)) == SteConfig.ABORT
    assert not ep.write(BUF, b"again").ok


def test_two_masters_in_different_l2_tables(r: PkvmRig) -> None:
    dom_a, ep_a = stage1(r, 0x10)
    dom_b, ep_b = stage1(r, 0x345)
    assert dom_a.map_pages(IOVA, BUF, 4096, 1, RWC) == (4096, 0)
    assert dom_b.map_pages(IOVA, BUF + 0x4000, 4096, 1, RWC) == (4096, 0)
    assert ep_a.write(IOVA, b"A").ok and ep_b.write(IOVA, b"B").ok
    assert r.ram(BUF, 1) == b"A" and r.ram(BUF + 0x4000, 1) == b"B"
    assert len(r.events("hyp.smmuv3", "strtab.l2")) == 2


def test_the_host_cannot_touch_the_shadows(r: PkvmRig) -> None:
    assert isinstance(r.host_cpu.read(r.hyp.strtab_base, 8), CpuFault)
    assert r.hyp.cmdq is not None
    assert isinstance(r.host_cpu.write(r.hyp.cmdq.base, 8, 0), CpuFault)
    idmap = r.iommu.idmap
    assert idmap is not None and isinstance(r.host_cpu.read(idmap.root, 8), CpuFault)


def test_the_trace_counts_what_a_report_needs(r: PkvmRig) -> None:
    stage1(r)
    counters = r.counters
    traps = counters.by_field("hyp.smmuv3", "trap", "reg")
    assert traps["CMDQ_PROD"] >= 5 and traps["CMDQ_CONS"] >= 1 and traps["IDR0"] == 1
    seen = counters.by_field("hyp.smmuv3", "cmd.seen", "opcode")
    assert seen[Opcode.CFGI_STE.name] >= 3 and seen[Opcode.SYNC.name] >= 5
    assert counters.by_field("hyp.smmuv3", "ste.shadow", "how") == {"abort": 1, "nested": 1}
    assert counters.get("hyp.iommu", "idmap.build") == 1
    used = sum(e.fields["pages"] for e in r.events("hyp.iommu", "pool.alloc"))
    used -= sum(e.fields["pages"] for e in r.events("hyp.iommu", "pool.free"))
    assert used == r.iommu.pool.pages_in_use > 0
    assert r.warnings() == ["CFGI_STE with Leaf=0 not shadowed"]  # the host's L1 CFGI (not Linux's)
