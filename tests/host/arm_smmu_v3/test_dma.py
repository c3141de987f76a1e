"""The driver against the SmmuV3 model: attach, map, DMA, unmap + invalidation, fault events,
CMD_SYNC completion by MSI or by CONS, and command-queue error recovery."""

from __future__ import annotations

import os
import sys

from pkvm_smmu.arch.commands import CMD_SIZE, Opcode, build_command, decode_command
from pkvm_smmu.arch.registers import CMDQ_CONS, Reg
from pkvm_smmu.arch.strtab import CD, STE, S1Dss, SteConfig
from pkvm_smmu.host.arm_smmu_v3.domain import ArmSmmuDomain, ArmSmmuIommuOps
from pkvm_smmu.host.arm_smmu_v3.features import Feat
from pkvm_smmu.machine.bus import HOST_CPU, Access
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.smmu import SmmuFeatures
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.prot import Prot

sys.path.insert(0, os.path.dirname(__file__))
from armsmmu_rig import RAM_BASE, SMMU_BASE, Rig, make_rig

RW = Prot.READ | Prot.WRITE | Prot.CACHE
IOVA = 0x1000_0000
BUF = RAM_BASE + 0x0200_0000
SID = 0x10


def attach_paging(r: Rig, sid: int = SID, name: str = "ep0", **kw: object) -> tuple[ArmSmmuDomain, object]:
    assert r.ops is not None
    dev = r.add_master(name, [sid], **kw)  # type: ignore[arg-type]
    dom = r.ops.domain_alloc_paging(dev)
    assert isinstance(dom, ArmSmmuDomain)
    assert dom.attach_dev(dev) == 0
    return dom, dev


def ram(r: Rig, pa: int, n: int) -> bytes:
    data = r.bus.read_bytes(HOST_CPU, pa, n)
    assert isinstance(data, bytes)
    return data


def commands(r: Rig) -> list[str]:
    return [e.fields["command"] for e in r.events("cmdq.issue")]


def test_stage1_attach_writes_cd_and_ste() -> None:
    r = make_rig()
    dom, _ = attach_paging(r)
    assert dom.stage == ArmSmmuDomain.STAGE1 and dom.asid == 1
    ste = r.ste(SID)
    assert STE.CONFIG.get(ste) == SteConfig.S1_TRANS and STE.S1DSS.get(ste) == S1Dss.SSID0
    cdptr = STE.S1CONTEXTPTR.get_address(ste)
    cd = CD.from_bytes(ram(r, cdptr, 64))
    assert CD.V.get(cd) and CD.ASID.get(cd) == 1 and CD.TTB0.get_address(cd) == dom.pgtbl.root  # type: ignore[union-attr]
    # abort -> CD-table STE: fill word 1 (1 sync), then word 0 (2): two CFGI_STE + CMD_SYNC rounds.
    cfgi_ste = [c for c in commands(r) if c.startswith("CMD_CFGI_STE(") and "LEAF=1" in c]
    assert len(cfgi_ste) == 2
    assert any(c.startswith("CMD_PREFETCH_CONFIG") for c in commands(r))


def test_dma_through_stage1_then_unmap_faults_with_an_event() -> None:
    r = make_rig()
    dom, _ = attach_paging(r)
    assert dom.map_pages(IOVA, BUF, 4096, 2, RW) == (8192, 0)
    ep = DmaEndpoint("ep0", r.smmu, SID)
    data = bytes(range(200))
    assert ep.write(IOVA + 0x1010, data).ok
    assert ram(r, BUF + 0x1010, len(data)) == data
    assert ep.read(IOVA + 0x1010, len(data)).data == data

    gather = IotlbGather()
    assert dom.unmap_pages(IOVA, 4096, 2, gather) == 8192
    # Without the invalidation the SMMU still uses its cached translation, as hardware would.
    assert ep.write(IOVA + 0x1010, b"stale").ok
    r.sink.clear()
    dom.iotlb_sync(gather)
    tlbis = [c for c in commands(r) if c.startswith("CMD_TLBI_NH_VA")]
    assert tlbis and all("ASID=1" in c for c in tlbis)
    assert commands(r)[-1].startswith("CMD_SYNC")

    result = ep.write(IOVA + 0x1234, b"x")
    assert not result.ok
    events = r.events("evtq.event")
    assert len(events) == 1
    f = events[0].fields
    assert f["event"] == "F_TRANSLATION" and f["sid"] == SID and f["client"] == "ep0"
    assert f["inputaddr"] == IOVA + 0x1234 and f["rnw"] == 0 and f["class"] == 2
    assert r.reg(Reg.EVENTQ_CONS) == r.reg(Reg.EVENTQ_PROD)  # consumed


def test_range_invalidation_uses_range_commands_only_with_ril() -> None:
    for ril in (True, False):
        r = make_rig(SmmuFeatures(cmdq_log2_max=8, eventq_log2_max=7, ril=ril))
        dom, _ = attach_paging(r)
        assert dom.map_pages(IOVA, BUF, 4096, 16, RW) == (16 * 4096, 0)
        gather = IotlbGather()
        dom.unmap_pages(IOVA, 4096, 16, gather)
        r.sink.clear()
        dom.iotlb_sync(gather)
        va = [c for c in commands(r) if c.startswith("CMD_TLBI_NH_VA")]
        if ril:
            # 16 pages = 0b10000: one command, (NUM+1) << SCALE = 1 << 4 pages, TG=4K, TTL=3.
            assert len(va) == 1 and "SCALE=4" in va[0] and "NUM=" not in va[0]
            assert "TG=G4K" in va[0] and "TTL=3" in va[0]
        else:
            assert len(va) == 16 and not any("NUM=" in c for c in va)


def test_flush_iotlb_all_and_domain_free_invalidate_the_asid() -> None:
    r = make_rig()
    dom, _ = attach_paging(r)
    r.sink.clear()
    dom.flush_iotlb_all()
    assert commands(r)[0].startswith("CMD_TLBI_NH_ASID") and "ASID=1" in commands(r)[0]


def test_stage2_domain_when_stage1_is_absent() -> None:
    r = make_rig(SmmuFeatures(cmdq_log2_max=8, eventq_log2_max=7, stage1=False, hyp=False))
    dom, _ = attach_paging(r)
    assert dom.stage == ArmSmmuDomain.STAGE2 and dom.vmid == 1
    ste = r.ste(SID)
    assert STE.CONFIG.get(ste) == SteConfig.S2_TRANS and STE.S2VMID.get(ste) == 1
    assert STE.S2TTB.get_address(ste) == dom.pgtbl.root  # type: ignore[union-attr]
    assert dom.map_pages(IOVA, BUF, 4096, 1, RW) == (4096, 0)
    ep = DmaEndpoint("ep0", r.smmu, SID)
    assert ep.write(IOVA + 8, b"s2!").ok and ram(r, BUF + 8, 3) == b"s2!"
    gather = IotlbGather()
    dom.unmap_pages(IOVA, 4096, 1, gather)
    r.sink.clear()
    dom.iotlb_sync(gather)
    assert any(c.startswith("CMD_TLBI_S2_IPA") and "VMID=1" in c for c in commands(r))
    assert not ep.write(IOVA + 8, b"no").ok


def test_identity_and_blocked_domains() -> None:
    r = make_rig()
    assert r.ops is not None
    dev = r.add_master("ep0", [SID])
    ep = DmaEndpoint("ep0", r.smmu, SID)
    assert not ep.write(BUF, b"blocked").ok  # initial STE: abort
    assert r.ops.identity_domain is not None and r.ops.identity_domain.attach_dev(dev) == 0
    assert STE.CONFIG.get(r.ste(SID)) == SteConfig.BYPASS
    assert ep.write(BUF, b"ident").ok and ram(r, BUF, 5) == b"ident"
    assert r.ops.blocked_domain is not None and r.ops.blocked_domain.attach_dev(dev) == 0
    assert STE.CONFIG.get(r.ste(SID)) == SteConfig.ABORT
    assert not ep.write(BUF, b"again").ok


def _sync_slot_reads(r: Rig) -> tuple[list[int], list[Access]]:
    """Issue one command with a CMD_SYNC; return the SYNC's slot words and the CONS reads made."""
    seen: list[Access] = []
    cons_reg = SMMU_BASE + Reg.CMDQ_CONS
    r.bus.observers.append(lambda a: seen.append(a) if a.address == cons_reg and not a.is_write else None)
    q = r.dev.cmdq.q  # type: ignore[union-attr]
    slot = q.idx(q.inc_prod_n(q.prod, 1))
    assert r.dev.cmdq.issue_cmd_with_sync(build_command(Opcode.TLBI_NSNH_ALL)) == 0  # type: ignore[union-attr]
    r.bus.observers.pop()
    raw = ram(r, q.base_dma + slot * CMD_SIZE, CMD_SIZE)
    return [
        slot,
        int.from_bytes(raw[:4], "little"),
        int.from_bytes(raw[4:8], "little"),
        int.from_bytes(raw, "little"),
    ], seen


def test_cmd_sync_with_msi_writes_into_its_own_queue_slot() -> None:
    r = make_rig()
    assert r.dev.features & Feat.MSI
    (slot, word0, msidata, raw), cons_reads = _sync_slot_reads(r)
    assert word0 == slot  # the SMMU's MSI overwrote the first word with MSIDATA
    assert msidata == slot
    # Word 0 (opcode, CS) is gone; the MSI address in word 1 names the slot itself.
    _, fields = decode_command(raw & ~0xFFFF_FFFF | Opcode.SYNC)
    assert fields["MSIADDR"] == r.dev.cmdq.q.base_dma + slot * CMD_SIZE  # type: ignore[union-attr]
    issued = commands(r)[-1]
    assert issued.startswith("CMD_SYNC") and "CS=IRQ" in issued and "MSIDATA=" in issued
    assert cons_reads == []  # completion came from memory, not from CONS
    assert any(e.fields.get("source") == "cmd-sync" and e.fields["msi"] for e in r.machine_events("irq"))


def test_cmd_sync_without_msi_polls_cons() -> None:
    r = make_rig(SmmuFeatures(cmdq_log2_max=8, eventq_log2_max=7, msi=False))
    (slot, word0, _msidata, raw), cons_reads = _sync_slot_reads(r)
    op, fields = decode_command(raw)
    assert op == Opcode.SYNC and fields["CS"] == 2 and fields["MSIADDR"] == 0  # SIG_SEV
    assert word0 == raw & 0xFFFF_FFFF and word0 != slot  # nothing wrote into the queue
    assert cons_reads and CMDQ_CONS.RD.get(r.reg(Reg.CMDQ_CONS)) == r.dev.cmdq.q.prod  # type: ignore[union-attr]


def test_illegal_command_is_skipped_and_the_queue_resumes() -> None:
    """CERROR_ILL: the GERROR handler turns the bad command into a CMD_SYNC, acknowledges, and the
    commands after it (and the caller's CMD_SYNC) complete."""
    r = make_rig()
    cmdq = r.dev.cmdq
    assert cmdq is not None
    bad = build_command(Opcode.TLBI_EL3_ALL)  # Secure-only: CERROR_ILL on the Non-secure queue
    assert cmdq.issue_cmdlist([bad, build_command(Opcode.TLBI_NSNH_ALL)], True) == 0
    errs = [e.fields for e in r.events("err")]
    assert any(f.get("message") == "CMDQ error" and f.get("error") == "Illegal command" for f in errs)
    assert any(f.get("message") == "skipping command in error state" for f in errs)
    assert r.reg(Reg.GERROR) == r.reg(Reg.GERRORN)  # acknowledged
    assert CMDQ_CONS.RD.get(r.reg(Reg.CMDQ_CONS)) == cmdq.q.prod
    # And later commands still work.
    assert cmdq.issue_cmd_with_sync(build_command(Opcode.TLBI_NSNH_ALL)) == 0


def test_illegal_command_without_an_irq_times_out() -> None:
    r = make_rig(wire_irqs=False)
    cmdq = r.dev.cmdq
    assert cmdq is not None
    assert cmdq.issue_cmdlist([build_command(Opcode.TLBI_EL3_ALL)], True) == -110  # -ETIMEDOUT
    assert any(e.kind == "cmdq.sync_timeout" for e in r.sink.events)
    # The polling entry point recovers it.
    assert r.dev.poll_irqs()
    assert cmdq.issue_cmd_with_sync(build_command(Opcode.TLBI_NSNH_ALL)) == 0


def test_event_queue_overflow_is_acknowledged() -> None:
    r = make_rig(SmmuFeatures(cmdq_log2_max=8, eventq_log2_max=2), wire_irqs=False)
    dev = r.add_master("ep0", [SID])
    del dev
    ep = DmaEndpoint("ep0", r.smmu, SID)
    # The STE aborts silently (Config=abort); a C_BAD_STREAMID per access to an absent SID instead.
    far = DmaEndpoint("far", r.smmu, 0x4000)
    for _ in range(6):
        assert not far.write(BUF, b"x").ok
    assert r.reg(Reg.EVENTQ_PROD) >> 31 == 1  # OVFLG toggled
    assert r.dev.handle_evtq_irq()
    events = r.events("evtq.event")
    assert len(events) == 4 and all(e.fields["event"] == "C_BAD_STREAMID" for e in events)
    assert events[0].fields["sid"] == 0x4000 and events[0].fields["client"] == "(unassigned sid)"
    assert any("overflow" in e.fields.get("message", "") for e in r.events("err"))
    assert r.reg(Reg.EVENTQ_CONS) >> 31 == 1  # OVACKFLG = OVFLG
    del ep


def test_event_and_gerror_msis_reach_the_handlers() -> None:
    """IDR0.MSI with an MSI allocator: *_IRQ_CFG0/1/2 point at an ITS doorbell, wired lines unused."""
    from pkvm_smmu.arch.registers import IRQ_CFG0
    from pkvm_smmu.machine.irq import MsiDoorbell, msi_line

    doorbell_base = 0x0808_0000
    data = {"eventq": 0x21, "gerror": 0x22, "priq": 0x23}

    def msi_alloc(source: str) -> tuple[int, int]:
        return doorbell_base + MsiDoorbell.TRANSLATER, data[source]

    r = make_rig(wire_irqs=False, irqs=(), msi_alloc=msi_alloc, probe=False)
    its = MsiDoorbell(r.irq)
    its.map(r.bus, doorbell_base)
    r.irq.connect(msi_line(0x21), lambda _line: r.dev.handle_evtq_irq())
    r.irq.connect(msi_line(0x22), lambda _line: r.dev.handle_gerror_irq())
    assert r.dev.probe() == 0
    r.ops = ArmSmmuIommuOps(r.dev)
    addr = IRQ_CFG0.ADDR.get_address(r.reg(Reg.EVENTQ_IRQ_CFG0, 8))
    assert addr == doorbell_base + MsiDoorbell.TRANSLATER and r.reg(Reg.EVENTQ_IRQ_CFG1) == 0x21
    assert r.reg(Reg.GERROR_IRQ_CFG1) == 0x22
    # A fault: the event MSI runs the event handler.
    far = DmaEndpoint("far", r.smmu, 0x5000)
    assert not far.write(BUF, b"x").ok
    assert [e.fields["event"] for e in r.events("evtq.event")] == ["C_BAD_STREAMID"]
    # A command error: the GERROR MSI runs the recovery.
    cmdq = r.dev.cmdq
    assert cmdq is not None
    assert cmdq.issue_cmdlist([build_command(Opcode.TLBI_EL3_ALL)], True) == 0
    assert (0x22 in [d for _, d in its.received]) and r.reg(Reg.GERROR) == r.reg(Reg.GERRORN)
