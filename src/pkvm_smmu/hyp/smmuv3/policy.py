"""The hyp SMMUv3 driver's emulation rules as one object (DESIGN.md rule 6, the *policy* axis).

``V4Policy`` is the series as posted (v4 patches 19-25, 28), known limitations included: it is a
model of what was posted, not of what should have been. Each rule is a small method, so a variant
(a hardened one, say) is a subclass overriding a few of them; ``POLICIES`` names them for the CLI.

What the driver asks of a policy:

- ``register_access``: how a trapped register access is handled (pass through, read-only with
  hidden bits, emulated, dropped) and which access size the series allows;
- the emulated registers' write rules: ``cr1_write``, ``cmdq_base_write``, ``cmdq_cons_write``,
  ``strtab_write``, ``gbpa_write``;
- ``filter_command``: what goes into the shadow command queue in place of one host command;
- the shadow command queue's robustness: ``cmdq_prod_write`` (accept a host PROD?),
  ``bounded_cmdq_traps`` (stop copying when the shadow queue stays full), ``cmdq_batch_per_trap``
  (how many host commands one trap handles), ``recovers_cmdq_errors``
  (the hyp skips a command the SMMU rejected, as ``arm_smmu_cmdq_skip_err``), and
  ``invalidation_failed`` (what an invalidation that did not complete does to the SMMU);
- ``cr0_hardware``: the CR0 value written to the SMMU for the host's (emulated) CR0;
- ``validate_strtab``, ``cfgi_ste`` and ``transform_ste``/``install_shadow_ste``: the shadow
  stream table.

Series behaviour where v4 is ambiguous, and the choice made (collected into docs/pkvm-model.md):

- A ``WARN_ON`` is a "warn" trace event and the model carries on, doing what the posted code does
  after the WARN, with two exceptions where the WARN guards the access itself (in production a
  hyp WARN ends in a panic, so the access never completes): a register access of the wrong size
  is dropped (reads as 0), and a CMDQ_CONS write while the queue is enabled is refused.
- Reads of STRTAB_BASE/STRTAB_BASE_CFG leave the host's register untouched as posted (an UNKNOWN
  value); the model returns the recorded value. Reads of a dropped register return 0.
- TLBI_NH_ASID/VA/VAA carry a "VMID 0 only" check whose both branches break: nothing is rejected.
- CFGI_STE with Leaf=0 warns and re-shadows nothing; the command itself still reaches the SMMU.
- A NESTED host STE is warned about and copied verbatim (its stage-2 fields included), since the
  posted ``smmu_attach_stage_2`` returns before touching it.
- SHCFG is ORed with "incoming" (``data[1] |= SHCFG_INCOMING``), so a host SHCFG of 0b10 becomes 0b11.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Protocol

from pkvm_smmu.arch.commands import (
    CMD_CFGI_STE,
    CMD_CFGI_STE_RANGE,
    CMD_SYNC,
    Opcode,
    SyncCs,
    cfgi_all,
)
from pkvm_smmu.arch.registers import (
    CR1,
    GBPA,
    IDR0,
    STRTAB_BASE_CFG,
    QueueCacheability,
    Reg,
    Shareability,
    StrtabFmt,
)
from pkvm_smmu.arch.strtab import STE, Shcfg, SteConfig

MASK64 = (1 << 64) - 1
STRTAB_SPLIT = 8
_DWORDS_2_3 = ((1 << 128) - 1) << 128


class RegAccess(Enum):
    PASS = "pass"  # read and write through to the SMMU
    READ_ONLY = "read-only"  # reads through (masked), writes dropped with a warning
    EMULATE = "emulate"  # the driver's emulation
    DROP = "drop"  # warning; reads 0, writes dropped


@dataclass(frozen=True)
class RegisterRule:
    """How one register is handled. ``size``: the access size the series allows (None: any);
    ``read_mask``: bits a read returns."""

    access: RegAccess
    size: int | None = None
    read_mask: int = MASK64


DROPPED = RegisterRule(RegAccess.DROP)


class CmdAction(StrEnum):
    PASS = "pass"
    REWRITE = "rewrite"
    DROP = "drop"


@dataclass(frozen=True)
class CommandVerdict:
    """What replaces one host command in the shadow queue (nothing when dropped)."""

    action: CmdAction
    commands: tuple[int, ...]
    reason: str = ""


class ShadowHow(StrEnum):
    """How a host STE became its shadow."""

    UNCHANGED = "unchanged"  # not valid: copied as is
    ABORT = "abort"
    S2_ONLY = "s2-only"  # bypass (or stage-2) -> stage 2 with the identity table
    NESTED = "nested"  # stage 1 -> stage 1 + identity stage 2
    IGNORED_NESTED = "ignored-nested"  # the host asked for nesting: copied verbatim


@dataclass(frozen=True)
class IdentityS2:
    """What an STE needs of the identity stage-2: its VTCR fields and S2TTB."""

    vtcr: Mapping[str, int]
    s2ttb: int
    vmid: int = 0


class SmmuContext(Protocol):
    """What a policy may use of the SMMU it rules (``HypSmmuV3``)."""

    name: str

    def warn(self, message: str, **fields: Any) -> None: ...

    @property
    def cmdq_enabled(self) -> bool:
        """The host's CR0.CMDQEN, as last written."""
        ...

    @property
    def smmu_enabled(self) -> bool:
        """The host's CR0.SMMUEN, as last written."""
        ...

    @property
    def two_level_strtab(self) -> bool: ...

    @property
    def sid_bits(self) -> int: ...

    def reshadow_ste(self, sid: int) -> None: ...

    def write_u64(self, pa: int, value: int) -> None:
        """A single-copy-atomic 64-bit store by the hyp (``WRITE_ONCE``)."""
        ...

    def send_cmd(self, command: int) -> int:
        """Issue a command of the hyp's own plus CMD_SYNC and wait; 0 or -ETIMEDOUT."""
        ...


def _linux_cr1() -> int:
    return CR1.encode(
        TABLE_SH=Shareability.ISH,
        TABLE_OC=QueueCacheability.WB,
        TABLE_IC=QueueCacheability.WB,
        QUEUE_SH=Shareability.ISH,
        QUEUE_OC=QueueCacheability.WB,
        QUEUE_IC=QueueCacheability.WB,
    )


LINUX_CR1 = _linux_cr1()
HIDDEN_IDR0 = (
    IDR0.S2P.in_place_mask | IDR0.VMID16.in_place_mask | IDR0.MSI.in_place_mask | IDR0.HYP.in_place_mask
)

_R32 = RegisterRule(RegAccess.READ_ONLY, size=4)
_P32 = RegisterRule(RegAccess.PASS, size=4)
_P64 = RegisterRule(RegAccess.PASS)
_E = RegisterRule(RegAccess.EMULATE)
_E32 = RegisterRule(RegAccess.EMULATE, size=4)

# smmu_dabt_device's switch, as of patch 25.
V4_REGISTERS: dict[int, RegisterRule] = {
    Reg.IDR0: RegisterRule(RegAccess.READ_ONLY, size=4, read_mask=MASK64 & ~HIDDEN_IDR0),
    Reg.IDR1: _R32,
    Reg.IDR3: _R32,
    Reg.IDR5: _R32,
    Reg.IIDR: _R32,
    Reg.GERROR: _R32,
    Reg.CR0: _E32,
    Reg.CR1: _E32,
    Reg.GBPA: _E32,
    Reg.CMDQ_BASE: _E,
    Reg.CMDQ_PROD: _E,
    Reg.CMDQ_CONS: _E,
    Reg.STRTAB_BASE: _E,
    Reg.STRTAB_BASE_CFG: _E,
    # "These should be safe, just enforce RO or RW and size according to architecture."
    Reg.EVENTQ_PROD: _P32,
    Reg.EVENTQ_CONS: _P32,
    Reg.EVENTQ_IRQ_CFG1: _P32,
    Reg.EVENTQ_IRQ_CFG2: _P32,
    Reg.PRIQ_PROD: _P32,
    Reg.PRIQ_CONS: _P32,
    Reg.PRIQ_IRQ_CFG1: _P32,
    Reg.PRIQ_IRQ_CFG2: _P32,
    Reg.GERRORN: _P32,
    Reg.GERROR_IRQ_CFG1: _P32,
    Reg.GERROR_IRQ_CFG2: _P32,
    Reg.IRQ_CTRLACK: _P32,
    Reg.IRQ_CTRL: _P32,
    Reg.CR0ACK: _P32,
    Reg.CR2: _P32,
    # 64-bit registers: no size check in the series.
    Reg.EVENTQ_BASE: _P64,
    Reg.EVENTQ_IRQ_CFG0: _P64,
    Reg.PRIQ_BASE: _P64,
    Reg.PRIQ_IRQ_CFG0: _P64,
    Reg.GERROR_IRQ_CFG0: _P64,
}

# The "malicious host" opcodes of smmu_filter_command: never used by Linux.
V4_DROPPED_OPCODES = frozenset(
    {
        Opcode.TLBI_NH_ALL,
        Opcode.TLBI_EL2_ALL,
        Opcode.TLBI_EL2_VA,
        Opcode.TLBI_EL2_ASID,
        Opcode.TLBI_S12_VMALL,
        Opcode.TLBI_EL2_VAA,
    }
)
_NH_BY_ASID_OR_VA = frozenset({Opcode.TLBI_NH_ASID, Opcode.TLBI_NH_VA, Opcode.TLBI_NH_VAA})


class V4Policy:
    """The emulation rules of "KVM: arm64: SMMUv3 driver for pKVM (trap and emulate)" v4."""

    name = "v4"
    registers: Mapping[int, RegisterRule] = V4_REGISTERS
    dropped_opcodes: frozenset[int] = V4_DROPPED_OPCODES
    # Take-over enables the shadow command queue (CR0.CMDQEN) after CFGI_ALL + TLBI_NSNH_ALL, so
    # the hyp's own commands (identity-map TLBIs) complete before the host driver probes. The
    # posted patches leave CMDQEN to the host's CR0 writes; False reproduces that.
    takeover_enables_cmdq = True

    # -- take-over (patch 17) ----------------------------------------------------------------------
    def takeover(self, smmu: SmmuContext) -> None:
        """Called before the hyp takes ``smmu`` over (a variant's hook; v4 does nothing)."""

    # -- registers (patch 19) -------------------------------------------------------------------
    def register_access(self, offset: int, size: int, is_write: bool) -> RegisterRule:
        return self.registers.get(offset, DROPPED)

    def passthrough_write(self, smmu: SmmuContext, offset: int, size: int, value: int) -> int | None:
        """The value a host write to a pass-through register puts in the SMMU, or None to drop it.
        v4: the host's value, unchanged."""
        return value

    def cr0_write(self, smmu: SmmuContext, value: int) -> int:
        """The CR0 value the emulation tracks as the host's. v4: the host's value."""
        return value

    def cr0_hardware(self, smmu: SmmuContext, host_cr0: int) -> int:
        """The CR0 value written to the SMMU for the host's CR0. v4: the same (patch 19)."""
        return host_cr0

    def register_read(self, smmu: SmmuContext, offset: int, size: int, value: int) -> int:
        """What a host read of a pass-through register (or of CR0) returns, given the SMMU's value.
        v4: the SMMU's value, unchanged."""
        return value

    def cr1_write(self, smmu: SmmuContext, value: int) -> int | None:
        """The value to write to the SMMU, or None to drop it. v4: written, but "don't mess with
        shareability/cacheability": warns unless it is Linux's value."""
        if value != LINUX_CR1:
            smmu.warn("CR1 is not Linux's value", value=value)
        return value

    # -- command queue registers (patches 20, 22) -------------------------------------------------
    def cmdq_base_write(self, smmu: SmmuContext, value: int) -> bool:
        """Record the host's CMDQ_BASE? v4: yes, warning if the queue is enabled."""
        if smmu.cmdq_enabled:
            smmu.warn("CMDQ_BASE written while the command queue is enabled", value=value)
        return True

    def cmdq_cons_write(self, smmu: SmmuContext, value: int) -> bool:
        """Accept a host CMDQ_CONS write? Only while the queue is disabled, so the host cannot skip
        commands it submitted."""
        if smmu.cmdq_enabled:
            smmu.warn("CMDQ_CONS written while the command queue is enabled", value=value)
            return False
        return True

    # Patch 22 as posted: every PROD is taken, copying goes on when the shadow queue stays full, and
    # a command the SMMU rejects stops the shadow queue until the host acknowledges the error.
    bounded_cmdq_traps = False
    recovers_cmdq_errors = False
    # Host commands handled per trap (None: all of them, as posted); the rest wait for the host's
    # next CMDQ_CONS read or PROD write.
    cmdq_batch_per_trap: int | None = None

    def cmdq_prod_write(self, smmu: SmmuContext, prod: int, cons: int, log2size: int) -> bool:
        """Accept a host CMDQ_PROD write, given the emulated CONS and the host queue's size? v4: yes."""
        return True

    def invalidation_failed(self, smmu: SmmuContext, what: str) -> None:
        """An invalidation the hyp issued did not complete (its CMD_SYNC timed out). v4 (patch 27)
        warns and carries on: the caches may still hold what was invalidated."""
        smmu.warn(f"{what} did not complete")

    # -- stream table registers (patch 23) --------------------------------------------------------
    def strtab_write(self, smmu: SmmuContext, reg: Reg, value: int) -> bool:
        """Record a STRTAB_BASE/STRTAB_BASE_CFG write? v4: yes, warning if SMMUEN is set."""
        if smmu.smmu_enabled:
            smmu.warn(f"{reg.name} written while the SMMU is enabled", value=value)
        return True

    def validate_strtab(self, smmu: SmmuContext, host_base: int, host_cfg: int) -> bool:
        """On SMMUEN 0->1: may the hyp share the host's table? v4 warns about a format or size
        Linux would not use ("Linux doesn't change the fmt nor size") and goes on."""
        fmt = STRTAB_BASE_CFG.FMT.get(host_cfg)
        if smmu.two_level_strtab:
            if fmt != StrtabFmt.TWO_LEVEL:
                smmu.warn("host stream table is not 2-level", cfg=host_cfg)
            if STRTAB_BASE_CFG.SPLIT.get(host_cfg) != STRTAB_SPLIT:
                smmu.warn("host stream table split is not STRTAB_SPLIT", cfg=host_cfg)
        else:
            if fmt != StrtabFmt.LINEAR:
                smmu.warn("host stream table is not linear", cfg=host_cfg)
            if STRTAB_BASE_CFG.LOG2SIZE.get(host_cfg) > smmu.sid_bits:
                smmu.warn("host stream table is larger than SIDSIZE", cfg=host_cfg)
        return True

    # -- GBPA (patch 25) --------------------------------------------------------------------------
    def gbpa_write(self, smmu: SmmuContext, value: int) -> int:
        """The value recorded for the host (the SMMU itself stays ABORT): the write without UPDATE,
        so the host's UPDATE poll completes at once."""
        return value & ~GBPA.UPDATE.in_place_mask

    # -- commands (patches 22, 24) ----------------------------------------------------------------
    def filter_command(self, smmu: SmmuContext, command: int) -> CommandVerdict:
        """``smmu_filter_command`` for one host command (already copied out of host memory)."""
        opcode = command & 0xFF
        if opcode == Opcode.CFGI_STE:
            self.cfgi_ste(smmu, CMD_CFGI_STE.SID.get(command), bool(CMD_CFGI_STE.LEAF.get(command)))
        elif opcode == Opcode.CFGI_STE_RANGE:
            # Linux only uses it as CFGI_ALL (on reset): not architectural, but relied upon.
            if CMD_CFGI_STE_RANGE.RANGE.get(command) != 31:
                smmu.warn("CFGI_STE_RANGE other than CFGI_ALL", command=command)
        elif opcode in _NH_BY_ASID_OR_VA:
            pass  # "Only allow VMID = 0": both branches break, nothing is rejected
        elif opcode in self.dropped_opcodes:
            smmu.warn("malicious host: command dropped", opcode=Opcode(opcode).name)
            return CommandVerdict(CmdAction.DROP, (), "malicious host")
        elif opcode == Opcode.SYNC and CMD_SYNC.CS.get(command) == SyncCs.IRQ:
            # "Allow it, but let the host timeout, as this should never happen."
            rewritten = CMD_SYNC.CS.set(command, SyncCs.SEV)
            rewritten = CMD_SYNC.MSIADDR.set(rewritten, 0)
            return CommandVerdict(CmdAction.REWRITE, (rewritten,), "SYNC with MSI -> SEV")
        return CommandVerdict(CmdAction.PASS, (command,))

    # -- stream table entries (patches 24, 28) -----------------------------------------------------
    def cfgi_ste(self, smmu: SmmuContext, sid: int, leaf: bool) -> None:
        """``smmu_reshadow_ste``'s guard: Linux only uses Leaf=1."""
        if not leaf:
            smmu.warn("CFGI_STE with Leaf=0 not shadowed", sid=sid)
            return
        smmu.reshadow_ste(sid)

    def transform_ste(self, smmu: SmmuContext, host_ste: int, s2: IdentityS2) -> tuple[int, ShadowHow]:
        """``smmu_attach_stage_2``: the shadow of one host STE, and how it was made."""
        config = STE.CONFIG.get(host_ste)
        if not STE.V.get(host_ste):
            return host_ste, ShadowHow.UNCHANGED
        if config == SteConfig.ABORT:
            return host_ste, ShadowHow.ABORT
        if config == SteConfig.NESTED:
            # "S2 is not advertised, that should never be attempted."
            smmu.warn("host STE asks for nesting: left as is", ste=STE.to_words(host_ste)[0])
            return host_ste, ShadowHow.IGNORED_NESTED
        ste = host_ste | STE.SHCFG.insert(Shcfg.INCOMING)
        # "The host shouldn't write dwords 2 and 3, overwrite them."
        ste &= ~_DWORDS_2_3
        vtcr = {name: s2.vtcr[name] for name in _VTCR_FIELDS}
        ste |= STE.encode(**vtcr, S2VMID=s2.vmid, S2AA64=1, S2R=1)
        ste |= STE.S2TTB.insert_address(s2.s2ttb & _S2TTB_MASK)
        # bypass -> stage 2 only, stage 1 -> nested
        new_config = config | 0b010
        ste = STE.CONFIG.set(ste, new_config)
        if not new_config & 0b100:
            return ste, ShadowHow.ABORT
        return ste, ShadowHow.NESTED if new_config == SteConfig.NESTED else ShadowHow.S2_ONLY

    def install_shadow_ste(self, smmu: SmmuContext, ste_pa: int, target: int) -> None:
        """Write the shadow STE: dwords 1-7 first, then the hyp's own CFGI_ALL + CMD_SYNC, then
        dword 0. The host's CFGI_STE, which follows in the queue, completes the update."""
        words = STE.to_words(target)
        for index in range(1, len(words)):
            smmu.write_u64(ste_pa + 8 * index, words[index])
        if smmu.send_cmd(cfgi_all()):
            smmu.warn("CFGI_ALL for a shadow STE did not complete")
        smmu.write_u64(ste_pa, words[0])


_VTCR_FIELDS = ("S2T0SZ", "S2SL0", "S2IR0", "S2OR0", "S2SH0", "S2TG", "S2PS")
_S2TTB_MASK = ((1 << 52) - 1) & ~0xF  # STRTAB_STE_3_S2TTB_MASK: bits [51:4]

POLICIES: dict[str, type[V4Policy]] = {"v4": V4Policy}


def make_policy(name: str) -> V4Policy:
    """The policy registered under ``name`` (``KeyError`` naming the known ones otherwise)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None


__all__ = [
    "HIDDEN_IDR0",
    "LINUX_CR1",
    "POLICIES",
    "V4_DROPPED_OPCODES",
    "V4_REGISTERS",
    "CmdAction",
    "CommandVerdict",
    "IdentityS2",
    "RegAccess",
    "RegisterRule",
    "ShadowHow",
    "SmmuContext",
    "V4Policy",
    "make_policy",
]
