"""The named attacks: each a short script of the adversary's actions, built against the booted
system it will run on (addresses of foreign memory and of the host's buffers are looked up there;
the system is a pure function of its spec, so the script replays exactly).

Every attack's docstring names the class a reviewer of the design would try and the outcome
expected under each policy (``EXPECTED``). Addresses below: ``foreign #1`` is hyp RAM
(0x40000000 on the default platform, 1 GiB aligned), ``buffer #n`` the adversary's host pages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from pkvm_smmu.arch.commands import CMD_SYNC, Opcode, SyncCs, build_command, cfgi_all
from pkvm_smmu.arch.registers import CR0, EVENTQ_BASE, GBPA, IRQ_CTRL, STRTAB_BASE_CFG, Reg, StrtabFmt
from pkvm_smmu.arch.strtab import CD, L1STD, STE, Eats, S1Dss, SteConfig
from pkvm_smmu.verify.adversary import (
    Action,
    Advance,
    Attach,
    Command,
    Dma,
    Donate,
    IommuMap,
    MemWrite,
    RegRead,
    RegWrite,
    System,
    resolve,
)

SID_PLAIN = 0x8  # 00:01.0, not ATS-capable
SID_ATS = 0x10  # 00:02.0, ATS-capable
SID_SPARE = 0x18  # 00:03.0
PLAIN_DEVICE = 1  # index of 00:01.0 among the host's DMA devices
IOVA = 0x10_0000
_RUN = CR0.encode(SMMUEN=1, EVENTQEN=1, CMDQEN=1, ATSCHK=1)  # what Linux runs with here
ACK_NS = 10_000


class Outcome(StrEnum):
    VIOLATION = "violation"  # the oracle (or an observed access, the hyp's included) found one
    SANITIZER = "sanitizer"  # the sanitizer reported the hyp relying on what is not guaranteed
    CRASH = "crash"  # an exception escaped from the model, the hyp or a checker; or a hang
    STALL = "stall"  # one host action kept the hyp busy past the campaign's limit (denial of service)
    BLOCKED = "blocked"  # nothing found after boot


@dataclass(frozen=True)
class Attack:
    name: str
    attack_class: str
    script: Callable[[System], list[Action]]
    expected: dict[str, Outcome]
    sanitizer: bool = False

    @property
    def description(self) -> str:
        return " ".join((self.script.__doc__ or "").split())

    def actions(self, system: System) -> list[Action]:
        return self.script(system)


# -- encodings the scripts use ------------------------------------------------------------------------


def _hyp_ram(system: System) -> int:
    address = resolve(system, "foreign", 1)
    assert address is not None, "no hyp RAM run"
    return address


def _buffer(system: System, index: int) -> int:
    address = resolve(system, "buffer", index)
    assert address is not None, "no adversary buffer"
    return address


def _ste_writes(sid: int, ste: int) -> list[Action]:
    """The host rewrites its STE for ``sid`` (one 64-byte store: what a racing CPU could do)."""
    return [MemWrite("ste", sid, 0, 64, ste)]


def _cfgi(sid: int, leaf: bool = True) -> Command:
    return Command(0, build_command(Opcode.CFGI_STE, SID=sid, LEAF=int(leaf)))


def _s2_block_table(system: System, table: int) -> list[Action]:
    """A stage-2 level-1 table (4 KiB granule, 39-bit IPA) in ``table``: IPA [1 GiB, 2 GiB) -> a
    1 GiB block at hyp RAM's 1 GiB, RW."""
    block = (_hyp_ram(system) & ~((1 << 30) - 1)) | (1 << 10) | (0b11 << 8) | (0b11 << 6) | (0xF << 2) | 1
    return [MemWrite("raw", 0, table + 8, 8, block)]


def _own_s2_fields(table: int) -> int:
    return STE.encode(
        S2VMID=5, S2T0SZ=25, S2SL0=1, S2TG=0, S2PS=2, S2AA64=1, S2R=1, S2IR0=1, S2OR0=1, S2SH0=3
    ) | STE.S2TTB.insert_address(table)


def _dma_hyp(system: System, sid: int = SID_PLAIN, address: int | None = None, write: bool = True) -> Dma:
    return Dma(0, sid, None, _hyp_ram(system) if address is None else address, 8, write)


def _cr0(value: int) -> list[Action]:
    """A CR0 write, then time for the SMMU to acknowledge it (the host would poll CR0ACK)."""
    return [RegWrite(0, Reg.CR0, 4, value), Advance(ACK_NS)]


def _irq_ctrl(value: int) -> list[Action]:
    return [RegWrite(0, Reg.IRQ_CTRL, 4, value), Advance(ACK_NS)]


def _quiet_ats() -> list[Action]:
    """Abort 00:02.0's stream, so the boot-time ATS hole of v4 does not mask what the attack tests."""
    return [*_ste_writes(SID_ATS, STE.encode(V=1, CONFIG=SteConfig.ABORT)), _cfgi(SID_ATS)]


def _cd_table(system: System, at: int, ttb0: int) -> list[Action]:
    cd = CD.encode(V=1, T0SZ=25, TG0=0, IR0=1, OR0=1, SH0=3, IPS=2, AA64=1, R=1, A=1, ASET=1, EPD1=1, ASID=7)
    cd |= CD.TTB0.insert_address(ttb0)
    return [MemWrite("raw", 0, at, 64, cd)]


def _donate_while_cached(buffer: int, *between: Action) -> list[Action]:
    """A host mapping of buffer ``buffer`` used by 00:01.0 (its translation now in the TLB), then
    ``between``, then the page donated to a protected guest and written through the mapping."""
    return [
        *_quiet_ats(),
        Attach(PLAIN_DEVICE, "paging"),
        IommuMap(PLAIN_DEVICE, IOVA, "buffer", buffer, 0, 4096, 3),
        Dma(0, SID_PLAIN, None, IOVA, 8, False),
        *between,
        Donate("donate-guest", "buffer", buffer),
        Dma(0, SID_PLAIN, None, IOVA, 8, True),
    ]


# -- the attacks ------------------------------------------------------------------------


def gbpa_bypass(system: System) -> list[Action]:
    """GBPA bypass: the host turns the SMMU off and asks GBPA for bypass (ABORT=0, UPDATE), then a
    device writes hyp RAM. Patch 25 records the host's GBPA and leaves the SMMU's at ABORT: blocked."""
    return [
        *_cr0(CR0.ATSCHK.in_place_mask),
        RegWrite(0, Reg.GBPA, 4, GBPA.UPDATE.in_place_mask),
        _dma_hyp(system),
    ]


def ste_bypass_without_cfgi(system: System) -> list[Action]:
    """STE rewritten to bypass behind the hyp's back: the host's STE becomes Config=BYPASS with no
    CFGI_STE. The SMMU reads the shadow stream table only: blocked."""
    return [*_ste_writes(SID_PLAIN, STE.encode(V=1, CONFIG=SteConfig.BYPASS)), _dma_hyp(system)]


def ste_bypass_with_cfgi(system: System) -> list[Action]:
    """STE rewritten to bypass, then CFGI_STE: patch 28 turns bypass into stage 2 with the identity
    table, which does not map hyp RAM: blocked."""
    ste = STE.encode(V=1, CONFIG=SteConfig.BYPASS)
    return [*_ste_writes(SID_PLAIN, ste), _cfgi(SID_PLAIN), _dma_hyp(system)]


def ste_host_stage2(system: System) -> list[Action]:
    """STE rewritten to stage 2 with a host-chosen S2TTB (a table mapping hyp RAM), then CFGI_STE:
    patch 28 overwrites dwords 2-3 with the identity stage 2: blocked."""
    table = _buffer(system, 0)
    ste = STE.encode(V=1, CONFIG=SteConfig.S2_TRANS) | _own_s2_fields(table)
    ipa = 1 << 30
    return [
        *_s2_block_table(system, table),
        *_ste_writes(SID_PLAIN, ste),
        _cfgi(SID_PLAIN),
        _dma_hyp(system, address=ipa),
    ]


def ste_nested(system: System) -> list[Action]:
    """STE rewritten to NESTED (stage 1 bypassed through S1DSS, stage 2 = a host table mapping hyp
    RAM), then CFGI_STE: v4 (patch 28) warns and copies a NESTED STE verbatim, so the host's own
    stage 2 reaches the SMMU: violation. Hardened: treated as stage 1 nested under the identity."""
    table = _buffer(system, 0)
    ste = STE.encode(V=1, CONFIG=SteConfig.NESTED, S1CDMAX=1, S1DSS=S1Dss.BYPASS) | _own_s2_fields(table)
    return [
        *_s2_block_table(system, table),
        *_ste_writes(SID_PLAIN, ste),
        _cfgi(SID_PLAIN),
        _dma_hyp(system, address=1 << 30),
    ]


def cd_pointer_hyp(system: System) -> list[Action]:
    """Nested stage 1: the host's STE points S1ContextPtr at hyp RAM. Patch 28 makes stage 1 nested,
    so the CD address is an IPA through the identity stage 2, which does not map hyp RAM: blocked."""
    ste = STE.encode(V=1, CONFIG=SteConfig.S1_TRANS) | STE.S1CONTEXTPTR.insert_address(_hyp_ram(system))
    return [*_ste_writes(SID_PLAIN, ste), _cfgi(SID_PLAIN), Dma(0, SID_PLAIN, None, IOVA, 8, True)]


def cd_tables_hyp(system: System) -> list[Action]:
    """Nested stage 1: a CD whose TTB0 is hyp RAM (the SMMU would walk hyp memory as a table):
    table addresses are IPAs through the identity stage 2: blocked."""
    cd_at = _buffer(system, 1)
    ste = STE.encode(V=1, CONFIG=SteConfig.S1_TRANS) | STE.S1CONTEXTPTR.insert_address(cd_at)
    return [
        *_cd_table(system, cd_at, _hyp_ram(system)),
        *_ste_writes(SID_PLAIN, ste),
        _cfgi(SID_PLAIN),
        Dma(0, SID_PLAIN, None, IOVA, 8, True),
    ]


def strtab_base_hyp(system: System) -> list[Action]:
    """Stream table base pointed at hyp RAM while the SMMU is off, then enabled: patch 23 shares
    the host table on SMMUEN 0->1, which fails for hyp memory; the SMMU only ever sees the shadow."""
    cfg = STRTAB_BASE_CFG.encode(FMT=StrtabFmt.LINEAR, LOG2SIZE=6)
    return [
        *_cr0(CR0.encode(CMDQEN=1, ATSCHK=1)),
        RegWrite(0, Reg.STRTAB_BASE, 8, _hyp_ram(system)),
        RegWrite(0, Reg.STRTAB_BASE_CFG, 4, cfg),
        *_cr0(_RUN),
        _cfgi(SID_PLAIN),
        _dma_hyp(system),
    ]


def cmdq_base_hyp(system: System) -> list[Action]:
    """Command queue base pointed at hyp RAM: the hyp copies commands from the host queue it shares
    on CMDQEN 0->1 (patch 20), which fails for hyp memory; the SMMU reads the shadow queue only."""
    return [
        *_cr0(CR0.encode(SMMUEN=1, EVENTQEN=1, ATSCHK=1)),
        RegWrite(0, Reg.CMDQ_BASE, 8, _hyp_ram(system) | 8),
        RegWrite(0, Reg.CMDQ_CONS, 4, 0),
        *_cr0(_RUN),
        RegWrite(0, Reg.CMDQ_PROD, 4, 4),
        _dma_hyp(system),
    ]


def eventq_base_hyp(system: System) -> list[Action]:
    """Event queue base pointed at hyp RAM: v4 passes EVENTQ_BASE through (patch 19), so the SMMU
    writes event records into hyp memory: violation. Hardened: only host-owned, pinned queues."""
    return [
        *_cr0(CR0.encode(SMMUEN=1, CMDQEN=1, ATSCHK=1)),
        RegWrite(0, Reg.EVENTQ_BASE, 8, _hyp_ram(system) | EVENTQ_BASE.LOG2SIZE.insert(4)),
        *_cr0(_RUN),
        Dma(0, SID_PLAIN, None, 0xDEAD_0000, 8, True),
    ]


def priq_base_hyp(system: System) -> list[Action]:
    """PRI queue base pointed at hyp RAM and PRIQEN set: passed through by v4, but the platform's
    SMMU has no PRI (PRIQEN is RES0): blocked; hardened refuses the base anyway."""
    return [
        *_cr0(CR0.encode(SMMUEN=1, CMDQEN=1, ATSCHK=1)),
        RegWrite(0, Reg.PRIQ_BASE, 8, _hyp_ram(system) | 4),
        *_cr0(_RUN | CR0.PRIQEN.in_place_mask),
    ]


def gerror_msi_hyp(system: System) -> list[Action]:
    """GERROR_IRQ_CFG0 (an MSI address the SMMU writes) pointed at hyp RAM (IRQs off for the write,
    as the architecture requires) and the GERROR IRQ on,
    then an illegal command raises CMDQ_ERR: v4 passes IRQ_CFG0 through: violation. Hardened: MSIs
    are hidden from the host (IDR0.MSI) and their address registers are not written."""
    return [
        *_irq_ctrl(0),
        RegWrite(0, Reg.GERROR_IRQ_CFG0, 8, _hyp_ram(system)),
        *_irq_ctrl(IRQ_CTRL.encode(GERROR_IRQEN=1, EVENTQ_IRQEN=1)),
        Command(0, 0xFF, sync=True),
    ]


def eventq_msi_hyp(system: System) -> list[Action]:
    """EVENTQ_IRQ_CFG0 pointed at hyp RAM with the event IRQ on, then a faulting DMA: violation on
    v4 (the event MSI lands in hyp memory), blocked on hardened."""
    return [
        *_irq_ctrl(0),
        RegWrite(0, Reg.EVENTQ_IRQ_CFG0, 8, _hyp_ram(system)),
        *_irq_ctrl(IRQ_CTRL.encode(GERROR_IRQEN=1, EVENTQ_IRQEN=1)),
        Dma(0, SID_PLAIN, None, 0xDEAD_0000, 8, True),
    ]


def sync_msi_hyp(system: System) -> list[Action]:
    """CMD_SYNC with CS=IRQ and MSIADDR in hyp RAM: patch 22 rewrites it to SEV with no address:
    blocked."""
    sync = build_command(Opcode.SYNC, CS=SyncCs.IRQ)
    sync = CMD_SYNC.MSIADDR.set(sync, _hyp_ram(system) >> 2)
    return [Command(0, sync, sync=False), Command(0, build_command(Opcode.SYNC), sync=False)]


def ats_translated_hyp(system: System) -> list[Action]:
    """ATS: the ATS-capable 00:02.0 sends a Translated write to hyp RAM. Its host STE has
    EATS=TRANS, which v4 copies into the nested shadow: Translated traffic skips stage 2:
    violation. Hardened: EATS=TRANS becomes S1CHK under nesting (stage 2 still applies)."""
    return [Dma(0, SID_ATS, None, _hyp_ram(system), 8, True, "translated")]


def ats_check_off(system: System) -> list[Action]:
    """ATS fast mode: the host clears CR0.ATSCHK, so Translated traffic skips the stream table
    altogether; then a device forges a Translated write to hyp RAM. v4: violation. Hardened keeps
    ATSCHK set."""
    return [
        *_cr0(CR0.encode(SMMUEN=1, EVENTQEN=1, CMDQEN=1)),
        Dma(0, SID_PLAIN, None, _hyp_ram(system), 8, True, "translated"),
    ]


def ats_host_eats(system: System) -> list[Action]:
    """ATS: the host sets EATS=TRANS in the (stage 1) STE of the ATS-capable device and issues
    CFGI_STE, then an ATS translation request and a Translated write to hyp RAM. v4: violation."""
    ste = STE.encode(V=1, CONFIG=SteConfig.S1_TRANS, S1CDMAX=1, S1DSS=S1Dss.BYPASS, EATS=Eats.TRANS)
    return [
        *_ste_writes(SID_ATS, ste),
        _cfgi(SID_ATS),
        Dma(0, SID_ATS, None, IOVA, 8, True, "ats-request"),
        Dma(0, SID_ATS, None, _hyp_ram(system), 8, True, "translated"),
    ]


def stale_tlb_after_donation(system: System) -> list[Action]:
    """Stale TLB after a donation: a host mapping of buffer #3 is used (TLB warm), then the page is
    donated to a protected guest and used again. The hyp unmaps it from the identity stage 2 and
    invalidates (TLBI_S2_IPA + TLBI_NH_ALL + SYNC) before the donation returns: blocked."""
    return _donate_while_cached(3)


def invalidation_suppressed(system: System) -> list[Action]:
    """Suppressed and reordered invalidations: the host repoints its PTE behind the SMMU's back (no
    TLBI), donates the old page, issues CFGI_STE without a SYNC then a SYNC before anything else,
    and DMAs: the hyp's own invalidations on donation do not depend on the host's: blocked."""
    return [
        *_quiet_ats(),
        Attach(PLAIN_DEVICE, "paging"),
        IommuMap(PLAIN_DEVICE, IOVA, "buffer", 4, 0, 4096, 3),
        Dma(0, SID_PLAIN, None, IOVA, 8, False),
        Command(0, build_command(Opcode.SYNC), sync=False),
        _cfgi(SID_PLAIN),
        Donate("donate-guest", "buffer", 4),
        Command(0, build_command(Opcode.TLBI_NH_ASID, ASID=0), sync=False),
        Dma(0, SID_PLAIN, None, IOVA, 8, True),
    ]


def cmdq_off_then_donate(system: System) -> list[Action]:
    """Suppressed invalidations, the hyp's own: with a host mapping of buffer #5 warm in the TLB,
    the host writes CR0 without CMDQEN, then donates the page to a protected guest and DMAs to it.
    v4 passes CR0 to the SMMU (patch 19), so the hyp's TLBI_S2_IPA + CMD_SYNC for the donation is
    never consumed and its timeout is ignored (patch 27): the stale entry reaches guest memory
    (finding 9). The hardened hyp owns CMDQEN and emulates the host's bit: blocked."""
    return _donate_while_cached(5, *_cr0(CR0.encode(SMMUEN=1, EVENTQEN=1, ATSCHK=1)))


def wedged_cmdq_then_donate(system: System) -> list[Action]:
    """Malformed commands used to stop the hyp's queue: with buffer #5 warm in the TLB, the host
    issues CMD_RESUME (no stall support here) and CMD_SYNC with the reserved CS=0b11, then donates
    the page and DMAs to it. v4's filter passes both; the SMMU stops on CERROR_ILL and nothing
    acknowledges it, so the donation's invalidation never runs (finding 9). The hardened hyp drops
    commands the SMMU does not implement and acknowledges command errors itself after replacing
    the command with CMD_SYNC: blocked."""
    return _donate_while_cached(
        5,
        Command(0, build_command(Opcode.RESUME), sync=False),
        Command(0, build_command(Opcode.SYNC, CS=0b11), sync=False),
    )


def racing_new_l2(system: System) -> list[Action]:
    """Racing updates of what the hyp reads: the host publishes a new L2 table for StreamIDs
    0x200-0x2ff and issues CFGI_STE 0x200. v4 reads the host's L1 descriptor twice in one trap
    (once to find the STE, once to share the L2): a host CPU rewriting it in between makes the hyp
    share one L2 and copy the STE from another. The sanitizer reports the double fetch. Commands
    are copied once (patch 22), so a racing command rewrite is not reported."""
    l2 = _buffer(system, 2)
    ste = STE.encode(V=1, CONFIG=SteConfig.BYPASS)
    return [
        MemWrite("raw", 0, l2, 64, ste),
        MemWrite("strtab", 0, 2 * 8, 8, l2 | L1STD.encode(SPAN=9)),
        _cfgi(0x200),
        Dma(0, 0x200, None, _hyp_ram(system), 8, True),
    ]


def l1_repoint(system: System) -> list[Action]:
    """Rewiring a live 2-level L1 descriptor after enable: the host points L1[0] at a page it
    donated to a protected guest, then CFGI_STE 8. v4 reads STEs through the L1 descriptor as it
    is at each CFGI (patch 24), so the hyp loads guest memory it was never shared: violation (the
    hyp's load). Hardened: the L1 descriptor must match the L2 the hyp pinned."""
    guest_page = _buffer(system, 5)
    return [
        *_quiet_ats(),
        Donate("donate-guest", "buffer", 5),
        MemWrite("strtab", 0, 0, 8, guest_page | L1STD.encode(SPAN=9)),
        _cfgi(SID_PLAIN),
        _dma_hyp(system),
    ]


def illegal_commands(system: System) -> list[Action]:
    """Malformed and illegal commands: a reserved opcode, CFGI_STE_RANGE other than CFGI_ALL,
    CFGI_STE Leaf=0 after an STE rewrite, TLBI_EL2_ALL, TLBI_NH_ALL and TLBI_S12_VMALL. Errors
    stop the SMMU's queue (CERROR_ILL) until the host skips; nothing reaches hyp memory: blocked."""
    ste = STE.encode(V=1, CONFIG=SteConfig.BYPASS)
    return [
        Command(0, 0x7F),
        Command(0, build_command(Opcode.CFGI_STE_RANGE, SID=0, RANGE=5)),
        *_ste_writes(SID_PLAIN, ste),
        _cfgi(SID_PLAIN, leaf=False),
        Command(0, build_command(Opcode.TLBI_EL2_ALL)),
        Command(0, build_command(Opcode.TLBI_NH_ALL)),
        Command(0, build_command(Opcode.TLBI_S12_VMALL, VMID=0)),
        Command(0, cfgi_all()),
        _dma_hyp(system),
    ]


def queue_index_games(system: System) -> list[Action]:
    """CONS/PROD games: PROD moved backwards, PROD a full queue (and more) ahead of CONS with the
    wrap bit flipped, a CONS write while the queue is enabled. The hyp copies what is between its
    emulated CONS and PROD and refuses the CONS write, so isolation holds; but under v4 PROD moved
    backwards reads as a nearly full queue of garbage that the hyp drains synchronously, each
    illegal command waiting out its poll, keeping the hyp in one trap for over a minute of modeled
    time: a stall (denial of service, finding 8). The hardened hyp refuses a PROD more than a queue
    ahead of its emulated CONS and acknowledges command errors itself: blocked."""
    return [
        RegWrite(0, Reg.CMDQ_PROD, 4, 0),
        RegWrite(0, Reg.CMDQ_PROD, 4, 1 << 31 | 3),
        RegWrite(0, Reg.CMDQ_CONS, 4, 0x7FFF),
        RegRead(0, Reg.CMDQ_CONS, 4),
        Command(0, cfgi_all()),
        _dma_hyp(system),
    ]


def toggle_enables(system: System) -> list[Action]:
    """Toggling enables mid-operation: CMDQEN off with a new queue base, SMMUEN off with a new
    linear stream table (in buffer #6, STE 8 = bypass) and back on, a CFGI_STE, DMA. The hyp
    re-shares whatever is published at each enable and shadows through its own table: blocked."""
    table = _buffer(system, 6)
    cfg = STRTAB_BASE_CFG.encode(FMT=StrtabFmt.LINEAR, LOG2SIZE=6)
    return [
        *_cr0(CR0.encode(SMMUEN=1, EVENTQEN=1, ATSCHK=1)),
        RegWrite(0, Reg.CMDQ_BASE, 8, _buffer(system, 7) | 7),
        RegWrite(0, Reg.CMDQ_CONS, 4, 0),
        *_cr0(CR0.encode(CMDQEN=1, EVENTQEN=1, ATSCHK=1)),
        RegWrite(0, Reg.STRTAB_BASE, 8, table),
        RegWrite(0, Reg.STRTAB_BASE_CFG, 4, cfg),
        MemWrite("raw", 0, table + SID_PLAIN * 64, 64, STE.encode(V=1, CONFIG=SteConfig.BYPASS)),
        *_cr0(_RUN),
        _dma_hyp(system),
    ]


def out_of_range_sids(system: System) -> list[Action]:
    """Out-of-range StreamIDs: CFGI_STE for a StreamID beyond the stream table and beyond SIDSIZE,
    DMA from such StreamIDs: bad StreamID events, nothing reached: blocked."""
    return [
        _cfgi(0xFFFF_FFFF),
        _cfgi(1 << 20),
        Dma(0, 1 << 20, None, _hyp_ram(system), 8, True),
        Dma(0, 0xFFFF_FFFF, None, _hyp_ram(system), 8, True),
    ]


def _both(outcome: Outcome) -> dict[str, Outcome]:
    return {"v4": outcome, "hardened": outcome}


def _v4(outcome: Outcome) -> dict[str, Outcome]:
    return {"v4": outcome, "hardened": Outcome.BLOCKED}


_V, _B, _S = Outcome.VIOLATION, Outcome.BLOCKED, Outcome.SANITIZER

ATTACKS: tuple[Attack, ...] = (
    Attack("gbpa-bypass", "GBPA bypass", gbpa_bypass, _both(_B)),
    Attack("ste-bypass-no-cfgi", "STE behind the hyp's back", ste_bypass_without_cfgi, _both(_B)),
    Attack("ste-bypass-cfgi", "STE behind the hyp's back", ste_bypass_with_cfgi, _both(_B)),
    Attack("ste-host-s2", "STE behind the hyp's back", ste_host_stage2, _both(_B)),
    Attack("ste-nested", "STE behind the hyp's back", ste_nested, _v4(_V)),
    Attack("cd-pointer-hyp", "nested stage 1 / CDs", cd_pointer_hyp, _both(_B)),
    Attack("cd-tables-hyp", "nested stage 1 / CDs", cd_tables_hyp, _both(_B)),
    Attack("strtab-base-hyp", "table and queue bases", strtab_base_hyp, _both(_B)),
    Attack("cmdq-base-hyp", "table and queue bases", cmdq_base_hyp, _both(_B)),
    Attack("eventq-base-hyp", "table and queue bases", eventq_base_hyp, _v4(_V)),
    Attack("priq-base-hyp", "table and queue bases", priq_base_hyp, _both(_B)),
    Attack("gerror-msi-hyp", "address registers", gerror_msi_hyp, _v4(_V)),
    Attack("eventq-msi-hyp", "address registers", eventq_msi_hyp, _v4(_V)),
    Attack("sync-msi-hyp", "address registers", sync_msi_hyp, _both(_B)),
    Attack("ats-translated", "ATS", ats_translated_hyp, _v4(_V)),
    Attack("ats-check-off", "ATS", ats_check_off, _v4(_V)),
    Attack("ats-host-eats", "ATS", ats_host_eats, _v4(_V)),
    Attack("stale-tlb-donation", "stale TLB after donation", stale_tlb_after_donation, _both(_B)),
    Attack("invalidation-games", "suppressed/reordered invalidations", invalidation_suppressed, _both(_B)),
    Attack("cmdq-off-donation", "suppressed/reordered invalidations", cmdq_off_then_donate, _v4(_V)),
    Attack("wedged-cmdq-donation", "malformed commands", wedged_cmdq_then_donate, _v4(_V)),
    Attack("racing-l1-fetch", "racing updates (TOCTOU)", racing_new_l2, _v4(_S), sanitizer=True),
    Attack("l1-repoint", "2-level L1 rewiring", l1_repoint, _v4(_V)),
    Attack("illegal-commands", "malformed commands", illegal_commands, _both(_B)),
    Attack("queue-index-games", "CONS/PROD games", queue_index_games, _v4(Outcome.STALL)),
    Attack("toggle-enables", "enables mid-operation", toggle_enables, _both(_B)),
    Attack("out-of-range-sid", "out-of-range StreamIDs", out_of_range_sids, _both(_B)),
)

__all__ = ["ATTACKS", "Attack", "Outcome"]
