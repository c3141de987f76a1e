"""The shadow command queue (v4 patches 20-22): the host's queue shared and pinned while enabled,
each command copied out once, filtered by the v4 policy, placed in the hyp's queue and consumed
before the PROD write returns; CONS emulated with the hardware's ERR field."""

from __future__ import annotations

import errno
import os
import sys

import pytest

from pkvm_smmu.arch.commands import Opcode, SyncCs, build_command, cfgi_all
from pkvm_smmu.arch.queues import q_inc
from pkvm_smmu.arch.registers import CMDQ_CONS, GERROR, CmdqError, Reg
from pkvm_smmu.hyp.contracts import PageState
from pkvm_smmu.machine.bus import Access, InitiatorKind
from pkvm_smmu.machine.smmu import SmmuFeatures

sys.path.insert(0, os.path.dirname(__file__))
from hyp_smmu_rig import HOSTQ, SHADOW_STRTAB, HostQueue, PkvmRig, make_rig


def opcodes(commands: list[str]) -> list[str]:
    return [c.split("(")[0].removeprefix("CMD_") for c in commands]


@pytest.fixture
def r() -> PkvmRig:
    rig = make_rig()
    rig.sink.clear()
    return rig


def test_commands_are_consumed_before_the_prod_write_returns(r: PkvmRig) -> None:
    q = HostQueue(r)
    q.submit(build_command(Opcode.CFGI_CD, SID=3, SSID=0, LEAF=1), build_command(Opcode.SYNC, CS=SyncCs.SEV))
    assert opcodes(r.consumed()) == ["CFGI_CD", "SYNC"]
    assert r.host_read(Reg.CMDQ_CONS) == q.prod == 2
    assert r.host_read(Reg.CMDQ_PROD) == 2
    assert r.hyp.cmdq is not None and r.hyp.cmdq.empty()
    seen = r.counters.by_field("hyp.smmuv3", "cmd.seen", "opcode")
    assert seen == {"CFGI_CD": 1, "SYNC": 1}


def test_host_queue_is_shared_and_pinned_while_enabled(r: PkvmRig) -> None:
    mp = r.pkvm.mem_protect
    HostQueue(r, log2size=9)  # 8 KiB: two pages
    pfns = [HOSTQ >> 12, (HOSTQ >> 12) + 1]
    assert all(mp.host_state(p) is PageState.SHARED_OWNED and mp.pin_count(p) == 1 for p in pfns)
    assert mp.host_unshare_hyp(pfns[0]) == -errno.EBUSY  # the host cannot take it back
    assert mp.host_state((HOSTQ >> 12) + 2) is PageState.OWNED
    r.host_write(Reg.CR0, 0)
    assert all(mp.host_state(p) is PageState.OWNED and mp.pin_count(p) == 0 for p in pfns)


def test_queue_the_host_cannot_share_is_not_used(r: PkvmRig) -> None:
    q = HostQueue(r, base=SHADOW_STRTAB)  # hyp memory
    assert "host cmdq page not shared" in r.warnings()
    q.prod = 1
    r.host_write(Reg.CMDQ_PROD, 1)
    assert r.consumed() == [] and r.host_read(Reg.CMDQ_CONS) == 0
    assert "host command queue not shared: commands not consumed" in r.warnings()


def test_each_command_is_read_once_and_the_copy_is_what_runs(r: PkvmRig) -> None:
    """A racing host CPU rewrites the slot the moment the hyp has read it: what was read (and
    filtered) is what the SMMU executes, and no slot is read twice."""
    q = HostQueue(r)
    benign = build_command(Opcode.TLBI_NH_ASID, ASID=7)
    evil = build_command(Opcode.TLBI_EL2_ALL)
    reads: list[int] = []

    def race(access: Access) -> None:
        if access.initiator.kind is InitiatorKind.CPU_EL2 and HOSTQ <= access.address < HOSTQ + 0x1000:
            reads.append(access.address)
            r.bus.ram.write(access.address, evil.to_bytes(16, "little"))

    r.bus.observers.append(race)
    q.submit(benign, benign, cfgi_all())
    r.bus.observers.remove(race)
    assert reads == [HOSTQ, HOSTQ + 16, HOSTQ + 32]
    assert opcodes(r.consumed()) == ["TLBI_NH_ASID", "TLBI_NH_ASID", "CFGI_STE_RANGE"]
    assert "ASID=7" in r.consumed()[0]


def test_memory_changed_after_the_prod_write_has_no_effect(r: PkvmRig) -> None:
    q = HostQueue(r)
    q.submit(build_command(Opcode.TLBI_NH_ASID, ASID=1))
    r.host_cpu.write_bytes(q.slot_address(0), build_command(Opcode.TLBI_NSNH_ALL).to_bytes(16, "little"))
    q.submit(build_command(Opcode.SYNC))
    assert opcodes(r.consumed()) == ["TLBI_NH_ASID", "SYNC"]


PASSED = [
    cfgi_all(),
    build_command(Opcode.CFGI_CD, SID=1, SSID=2, LEAF=1),
    build_command(Opcode.CFGI_CD_ALL, SID=1),
    build_command(Opcode.PREFETCH_CONFIG, SID=1),
    build_command(Opcode.TLBI_NSNH_ALL),
    build_command(Opcode.TLBI_S2_IPA, VMID=5, ADDR=0x1000),
    build_command(Opcode.ATC_INV, SID=1, SIZE=52),
    build_command(Opcode.SYNC, CS=SyncCs.SEV),
    # "Only allow VMID = 0", but both branches break: other VMIDs go through too.
    build_command(Opcode.TLBI_NH_ASID, VMID=5, ASID=1),
    build_command(Opcode.TLBI_NH_VA, VMID=5, ASID=1, ADDR=0x2000),
    build_command(Opcode.TLBI_NH_VAA, VMID=5, ADDR=0x2000),
]


@pytest.mark.parametrize("command", PASSED, ids=lambda c: Opcode(c & 0xFF).name)
def test_filter_passes_unchanged(r: PkvmRig, command: int) -> None:
    q = HostQueue(r)
    q.submit(command)
    assert r.hyp.cmdq is not None
    shadow = r.ram(r.hyp.cmdq.base, 16 * 64)
    assert command.to_bytes(16, "little") in shadow
    assert r.counters.total("cmd.pass") == 1 and r.warnings() == []
    assert len(r.consumed()) == 1


@pytest.mark.parametrize(
    "opcode",
    [
        Opcode.TLBI_NH_ALL,
        Opcode.TLBI_EL2_ALL,
        Opcode.TLBI_EL2_VA,
        Opcode.TLBI_EL2_ASID,
        Opcode.TLBI_S12_VMALL,
        Opcode.TLBI_EL2_VAA,
    ],
)
def test_filter_drops_the_malicious_host_tlbis(r: PkvmRig, opcode: Opcode) -> None:
    q = HostQueue(r)
    q.submit(build_command(opcode), build_command(Opcode.SYNC))
    assert opcodes(r.consumed()) == ["SYNC"]
    assert r.host_read(Reg.CMDQ_CONS) == 2  # the host sees it consumed
    assert r.warnings() == ["malicious host: command dropped"]
    assert r.counters.by_field("hyp.smmuv3", "cmd.drop", "opcode") == {opcode.name: 1}


def test_cfgi_ste_range_other_than_all_warns_but_passes(r: PkvmRig) -> None:
    q = HostQueue(r)
    q.submit(build_command(Opcode.CFGI_STE_RANGE, SID=0x20, RANGE=3))
    assert opcodes(r.consumed()) == ["CFGI_STE_RANGE"]
    assert r.warnings() == ["CFGI_STE_RANGE other than CFGI_ALL"]


def test_sync_with_msi_is_rewritten_to_sev(r: PkvmRig) -> None:
    q = HostQueue(r)
    q.submit(build_command(Opcode.SYNC, CS=SyncCs.IRQ, MSIADDR=HOSTQ, MSIDATA=0x55))
    (consumed,) = r.consumed()
    assert "CS=SEV" in consumed and "MSIADDR" not in consumed and "MSIDATA=0x55" in consumed
    assert r.counters.total("cmd.rewrite") == 1
    # Nothing was written back into the host's queue.
    assert (
        r.ram(HOSTQ, 4) == build_command(Opcode.SYNC, CS=SyncCs.IRQ, MSIDATA=0x55).to_bytes(16, "little")[:4]
    )
    assert not [e for e in r.events(r.smmu.name, "irq") if e.fields.get("source") == "cmd-sync"]


def test_cons_reports_the_hardware_error(r: PkvmRig) -> None:
    q = HostQueue(r)
    q.submit(build_command(Opcode.TLBI_EL3_ALL))  # passes the filter; CERROR_ILL on the Non-secure queue
    assert "SMMU did not consume the shadow command queue" in r.warnings()
    cons = r.host_read(Reg.CMDQ_CONS)
    assert CMDQ_CONS.RD.get(cons) == 1  # the emulated index: everything was taken
    assert CMDQ_CONS.ERR.get(cons) == CmdqError.ILL
    assert GERROR.CMDQ_ERR.get(r.host_read(Reg.GERROR) ^ r.host_read(Reg.GERRORN))


def test_cons_writes_only_while_disabled(r: PkvmRig) -> None:
    q = HostQueue(r)
    q.submit(build_command(Opcode.SYNC))
    r.host_write(Reg.CMDQ_CONS, 0)  # would make the hyp replay the queue
    assert r.host_read(Reg.CMDQ_CONS) == 1
    assert r.warnings() == ["CMDQ_CONS written while the command queue is enabled"]
    r.host_write(Reg.CR0, 0)
    r.host_write(Reg.CMDQ_CONS, 5)
    assert r.host_read(Reg.CMDQ_CONS) == 5


def test_prod_write_while_disabled_is_only_recorded(r: PkvmRig) -> None:
    q = HostQueue(r)
    r.host_write(Reg.CR0, 0)
    q.write(build_command(Opcode.SYNC))
    r.host_write(Reg.CMDQ_PROD, 1)
    assert r.host_read(Reg.CMDQ_PROD) == 1 and r.consumed() == []


def test_more_commands_than_the_shadow_queue_holds() -> None:
    r = make_rig(SmmuFeatures(cmdq_log2_max=4))  # 16-entry shadow and host queues
    assert r.hyp.cmdq is not None and r.hyp.cmdq.entries == 16
    q = HostQueue(r, log2size=4)
    for round_ in range(3):  # wraps both queues
        batch = [build_command(Opcode.CFGI_CD, SID=round_, SSID=i, LEAF=1) for i in range(15)]
        q.submit(*batch, build_command(Opcode.SYNC))
    consumed = [c for c in r.consumed() if "CFGI_CD" in c]
    assert len(consumed) == 45 and "SID=2 SSID=0xe" in consumed[-1]
    assert r.host_read(Reg.CMDQ_CONS) == q.prod
    assert not r.warnings()


def test_a_host_batch_larger_than_the_shadow_queue_waits_for_space(r: PkvmRig) -> None:
    q = HostQueue(r, log2size=13)  # 8192 entries; the shadow holds 4096
    batch = [build_command(Opcode.CFGI_CD, SID=i >> 10, SSID=i & 0x3FF, LEAF=1) for i in range(4500)]
    q.submit(*batch, build_command(Opcode.SYNC))
    consumed = r.consumed()
    assert len(consumed) == 4501 and consumed[-1].startswith("CMD_SYNC")
    assert consumed[4499] == "CMD_CFGI_CD(OPCODE=CFGI_CD SID=4 SSID=0x193 LEAF=1)"
    assert r.host_read(Reg.CMDQ_CONS) == 4501
    assert r.hyp.cmdq is not None and r.hyp.cmdq.prod == q_inc(3, 4501, 12)  # 3 from the take-over; wrapped
    assert not r.warnings()
