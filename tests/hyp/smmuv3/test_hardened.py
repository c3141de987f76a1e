"""The hardened policy's fixes for the hyp's command path (docs/findings.md, findings 8 and 9), one
mechanism at a time, on the adversary's booted default platform; each is contrasted with v4."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pkvm_smmu.arch.commands import Opcode, build_command
from pkvm_smmu.arch.queues import q_empty, q_inc, q_slot, q_used
from pkvm_smmu.arch.registers import CMDQ_BASE, CMDQ_CONS, CR0, GERROR, CmdqError, Reg
from pkvm_smmu.hyp.smmuv3.hardened import implemented_opcodes
from pkvm_smmu.machine.smmu.executor import CommandExecutor
from pkvm_smmu.machine.smmu.features import SmmuFeatures
from pkvm_smmu.verify.adversary import (
    Attach,
    Command,
    Dma,
    Donate,
    IommuMap,
    RegRead,
    RegWrite,
    System,
    SystemSpec,
    build_system,
)
from pkvm_smmu.verify.fuzz import Session

SID_PLAIN = 0x8  # 00:01.0
PLAIN_DEVICE = 1
IOVA = 0x10_0000
_CMDQEN = CR0.CMDQEN.in_place_mask
_SMMUEN = CR0.SMMUEN.in_place_mask
_CMDQ_ERR = GERROR.CMDQ_ERR.in_place_mask


@pytest.fixture(params=["v4", "hardened"])
def booted(request: pytest.FixtureRequest) -> Iterator[tuple[str, System, Session]]:
    system = build_system(SystemSpec(policy=request.param))
    session = Session(system)
    at_boot = [f.signature for f in session.boot().findings]
    # v4's boot already has finding 1 (ATS); a session reports each class once
    assert at_boot == [] if request.param == "hardened" else at_boot
    try:
        yield request.param, system, session
    finally:
        system.close()


def _hw(system: System, reg: Reg) -> int:
    return system.smmus[0].regs.read(reg)


def _warm_tlb(session: Session) -> None:
    """A host mapping of buffer #5 used once: its stage-2 translation is in the SMMU's TLB."""
    for action in (
        Attach(PLAIN_DEVICE, "paging"),
        IommuMap(PLAIN_DEVICE, IOVA, "buffer", 5, 0, 4096, 3),
        Dma(0, SID_PLAIN, None, IOVA, 8, False),
    ):
        assert session.step(action).findings == []


def _isolation_findings(session: Session, *actions: object) -> list[str]:
    found: list[str] = []
    for action in actions:
        found += [f.signature for f in session.step(action).findings]  # type: ignore[arg-type]
    return found


def test_the_host_cannot_clear_cmdqen_but_sees_its_own_bit(booted: tuple[str, System, Session]) -> None:
    policy, system, session = booted
    session.step(RegWrite(0, Reg.CR0, 4, CR0.encode(SMMUEN=1, EVENTQEN=1, ATSCHK=1)))
    session.step(Dma(0, SID_PLAIN, None, IOVA, 8, False))  # let the SMMU acknowledge
    seen = session.step(RegRead(0, Reg.CR0ACK, 4)).result
    if policy == "v4":
        assert not _hw(system, Reg.CR0) & _CMDQEN  # patch 19 passes CR0 through
    else:
        assert _hw(system, Reg.CR0) & _CMDQEN and _hw(system, Reg.CR0ACK) & _CMDQEN
        assert seen.startswith("read") and not int(seen.split()[1], 16) & _CMDQEN


def test_an_illegal_command_does_not_stop_the_hyps_queue(booted: tuple[str, System, Session]) -> None:
    """CMD_SYNC with the reserved CS=0b11 passes both filters (it is implemented); the SMMU stops
    on CERROR_ILL. The hardened hyp replaces it and acknowledges the error itself."""
    policy, system, session = booted
    session.step(Command(0, build_command(Opcode.SYNC, CS=0b11), sync=False))
    drained = q_empty(_hw(system, Reg.CMDQ_PROD), _hw(system, Reg.CMDQ_CONS), _log2size(system))
    hyp_cmdq = system.hyp_driver.smmus[0].cmdq
    if policy == "v4":
        # stopped on the command (the host's GERROR handler acknowledges it, and it fails again)
        assert not drained and hyp_cmdq.errors_skipped == 0
        assert CMDQ_CONS.ERR.get(_hw(system, Reg.CMDQ_CONS)) == CmdqError.ILL
    else:
        assert drained and hyp_cmdq.errors_skipped == 1
        assert not (_hw(system, Reg.GERROR) ^ _hw(system, Reg.GERRORN)) & _CMDQ_ERR
        # and the queue still runs: a command of the hyp's completes
        assert system.hyp_driver.smmus[0].send_cmd(build_command(Opcode.TLBI_NSNH_ALL)) == 0


def _log2size(system: System) -> int:
    return CMDQ_BASE.LOG2SIZE.get(_hw(system, Reg.CMDQ_BASE))


def test_the_host_cannot_acknowledge_command_errors_for_the_hyp() -> None:
    system = build_system(SystemSpec(policy="hardened"))
    session = Session(system)
    try:
        session.boot()
        before = _hw(system, Reg.GERRORN)
        session.step(RegWrite(0, Reg.GERRORN, 4, before ^ _CMDQ_ERR))
        assert _hw(system, Reg.GERRORN) & _CMDQ_ERR == before & _CMDQ_ERR
    finally:
        system.close()


def test_a_prod_more_than_a_queue_ahead_is_refused(booted: tuple[str, System, Session]) -> None:
    policy, system, session = booted
    hyp = system.hyp_driver.smmus[0]
    cons = hyp.host_cons
    behind = (cons - 1) & ((2 << hyp.host_cmdq_shift) - 1)  # reads as 2^(n+1) - 1 commands
    outcome = session.step(RegWrite(0, Reg.CMDQ_PROD, 4, behind))
    if policy == "v4":
        assert [f.kind for f in outcome.findings] == ["stall"]
    else:
        assert outcome.findings == [] and hyp.host_prod != behind and hyp.host_cons == cons


def test_an_invalidation_that_does_not_complete_fences_the_smmu(booted: tuple[str, System, Session]) -> None:
    """Whatever stops the SMMU's command queue (here the test clears CMDQEN at the hardware, which
    no host action can do under hardened), a donation whose TLBI times out must not leave the
    stale entry usable: hardened turns SMMUEN off at the hardware (GBPA aborts), v4 carries on."""
    policy, system, session = booted
    _warm_tlb(session)
    smmu = system.smmus[0]
    smmu.regs.write(Reg.CR0, smmu.regs.read(Reg.CR0) & ~_CMDQEN)
    system.machine.clock.advance(20_000)
    found = _isolation_findings(
        session, Donate("donate-guest", "buffer", 5), Dma(0, SID_PLAIN, None, IOVA, 8, True)
    )
    if policy == "v4":
        assert any(":tlb" in signature for signature in found), found
    else:
        assert found == []
        assert not smmu.regs.read(Reg.CR0ACK) & _SMMUEN
        # the host's view is its own: it still believes the SMMU is on
        assert session.step(RegRead(0, Reg.CR0, 4)).result.startswith("read")
        assert system.hyp_driver.smmus[0].cr0 & _SMMUEN
        # and later host CR0 writes do not turn the hardware back on
        session.step(RegWrite(0, Reg.CR0, 4, CR0.encode(SMMUEN=1, CMDQEN=1, EVENTQEN=1, ATSCHK=1)))
        system.machine.clock.advance(20_000)
        assert not smmu.regs.read(Reg.CR0ACK) & _SMMUEN


@pytest.mark.parametrize(
    "features",
    [
        SmmuFeatures(),
        SmmuFeatures(ats=False, hyp=False),
        SmmuFeatures(stage1=False),
        SmmuFeatures(stall_model=0b00, priq_log2_max=8),
    ],
    ids=["default", "no-ats", "s2-only", "stalls"],
)
def test_the_hyps_opcode_list_matches_what_the_smmu_executes(features: SmmuFeatures) -> None:
    """The hyp derives the implemented commands from IDR0 (the specification's feature gates);
    the SMMU model answers CERROR_ILL for the others. They must agree, or a command the hyp lets
    through stops its queue."""

    class _Smmu:
        pass

    smmu = _Smmu()
    smmu.features = features  # type: ignore[attr-defined]
    executed = set(CommandExecutor._build_handlers(_as_executor(smmu)))
    assert implemented_opcodes(features.idr0()) <= executed
    assert executed - implemented_opcodes(features.idr0()) <= {
        Opcode.TLBI_EL2_ALL,
        Opcode.TLBI_EL2_ASID,
        Opcode.TLBI_EL2_VA,
        Opcode.TLBI_EL2_VAA,
    }


def _as_executor(smmu: object) -> CommandExecutor:
    executor = CommandExecutor.__new__(CommandExecutor)
    executor.smmu = smmu  # type: ignore[assignment]
    return executor


def test_one_trap_handles_a_bounded_batch_and_cons_reads_continue() -> None:
    """300 host commands published by one PROD write: hardened handles 128 in that trap and 128
    more on each CMDQ_CONS read the host makes while it waits; v4 handles all 300 at once."""
    for policy, first_batch in (("v4", 300), ("hardened", 128)):
        system = build_system(SystemSpec(policy=policy))
        session = Session(system)
        try:
            session.boot()
            hyp = system.hyp_driver.smmus[0]
            shift, cons = hyp.host_cmdq_shift, hyp.host_cons
            nop = build_command(Opcode.PREFETCH_CONFIG, SID=0x8).to_bytes(16, "little")
            for n in range(300):
                slot = q_slot(q_inc(cons, n, shift), shift)
                system.machine.bus.ram.write(hyp.host_cmdq.start + 16 * slot, nop)
            prod = q_inc(cons, 300, shift)
            session.step(RegWrite(0, Reg.CMDQ_PROD, 4, prod))
            assert q_used(hyp.host_cons, cons, shift) == first_batch
            session.step(RegRead(0, Reg.CMDQ_CONS, 4))
            assert q_used(hyp.host_cons, cons, shift) == min(300, 2 * first_batch)
        finally:
            system.close()
