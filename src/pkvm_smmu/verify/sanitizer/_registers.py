"""Check 3: the register interface's contracts (IHI 0070 §6.3).

- Guarded writes: a register (or field) its enable guards, written while the enable or its ACK
  is set (STRTAB_* and CR2 by SMMUEN; a queue's BASE and the index software does not own by that
  queue's enable; CR1's QUEUE_* and TABLE_* fields; IRQ_CFGn by their IRQ_CTRL enable); GBPA
  written while an update is pending or without UPDATE.
- Before ACK: CR0 or IRQ_CTRL rewritten before the previous write was acknowledged; CMDQ_PROD
  written while a CMDQEN change is not acknowledged; a DMA while an SMMUEN or ATSCHK change is not
  acknowledged, or, with the SMMU disabled, while a GBPA update is pending.
- Queue indexes: bits set above the index (LOG2SIZE + 1 bits); with the queue enabled, CMDQ_PROD
  moved backwards or past full, an output queue's CONS moved backwards or past its PROD.

For a register write the report's writer is the write; for a DMA it is the enable's write that was
not acknowledged, and ``at`` the DMA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm_smmu.arch.queues import q_space, q_used
from pkvm_smmu.arch.registers import (
    CMDQ_CONS,
    CR0,
    CR1,
    EVENTQ_CONS,
    EVENTQ_PROD,
    GBPA,
    IRQ_CTRL,
    REG_SIZE,
    Reg,
)
from pkvm_smmu.machine.bus import Access
from pkvm_smmu.verify.sanitizer._context import RunContext
from pkvm_smmu.verify.sanitizer._report import Check, Location, SanitizerReport

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

_SMMUEN = CR0.SMMUEN.in_place_mask
_CMDQEN = CR0.CMDQEN.in_place_mask
_EVENTQEN = CR0.EVENTQEN.in_place_mask
_PRIQEN = CR0.PRIQEN.in_place_mask
_ATSCHK = CR0.ATSCHK.in_place_mask
_QUEUE_ENABLES = _CMDQEN | _EVENTQEN | _PRIQEN
_CR1_QUEUE = CR1.QUEUE_IC.in_place_mask | CR1.QUEUE_OC.in_place_mask | CR1.QUEUE_SH.in_place_mask
_CR1_TABLE = CR1.TABLE_IC.in_place_mask | CR1.TABLE_OC.in_place_mask | CR1.TABLE_SH.in_place_mask
_GBPA_UPDATE = GBPA.UPDATE.in_place_mask
_MASK32 = 0xFFFF_FFFF

# Register -> the CR0 enable that guards it.
_CR0_GUARDED = {
    Reg.STRTAB_BASE: _SMMUEN,
    Reg.STRTAB_BASE_CFG: _SMMUEN,
    Reg.CR2: _SMMUEN,
    Reg.CMDQ_BASE: _CMDQEN,
    Reg.CMDQ_CONS: _CMDQEN,
    Reg.EVENTQ_BASE: _EVENTQEN,
    Reg.EVENTQ_PROD: _EVENTQEN,
    Reg.PRIQ_BASE: _PRIQEN,
    Reg.PRIQ_PROD: _PRIQEN,
}
_CR0_NAMES = {_SMMUEN: "SMMUEN", _CMDQEN: "CMDQEN", _EVENTQEN: "EVENTQEN", _PRIQEN: "PRIQEN"}
# Register -> the IRQ_CTRL enable that guards it.
_IRQ_GUARDED = {
    **dict.fromkeys(
        (Reg.GERROR_IRQ_CFG0, Reg.GERROR_IRQ_CFG1, Reg.GERROR_IRQ_CFG2), IRQ_CTRL.GERROR_IRQEN.in_place_mask
    ),
    **dict.fromkeys(
        (Reg.EVENTQ_IRQ_CFG0, Reg.EVENTQ_IRQ_CFG1, Reg.EVENTQ_IRQ_CFG2), IRQ_CTRL.EVENTQ_IRQEN.in_place_mask
    ),
    **dict.fromkeys(
        (Reg.PRIQ_IRQ_CFG0, Reg.PRIQ_IRQ_CFG1, Reg.PRIQ_IRQ_CFG2), IRQ_CTRL.PRIQ_IRQEN.in_place_mask
    ),
}
# Output queue CONS register -> (its BASE, its PROD, its enable, flag bits software may set).
_OUTPUT_QUEUES = {
    Reg.EVENTQ_CONS: (Reg.EVENTQ_BASE, Reg.EVENTQ_PROD, _EVENTQEN, EVENTQ_CONS.OVACKFLG.in_place_mask),
    Reg.PRIQ_CONS: (Reg.PRIQ_BASE, Reg.PRIQ_PROD, _PRIQEN, EVENTQ_CONS.OVACKFLG.in_place_mask),
}
# 4-byte-aligned offset -> (register, upper half?)
REG_AT: dict[int, tuple[Reg, bool]] = {}
for _reg in Reg:
    REG_AT[int(_reg)] = (_reg, False)
    if REG_SIZE[_reg] == 8:
        REG_AT[int(_reg) + 4] = (_reg, True)


class RegisterCheck:
    """Check 3 on one SMMU."""

    def __init__(self, run: RunContext, smmu: SmmuV3) -> None:
        self.run = run
        self.smmu = smmu
        regs = smmu.regs
        # What software last wrote, and the writes whose update is not acknowledged yet.
        self._cr0 = regs.cr0
        self._cr0_pending: Location | None = None
        self._irq_ctrl = regs.irq_ctrl
        self._irq_ctrl_pending: Location | None = None
        self._gbpa_pending: Location | None = None
        self._cmdq_prod = regs.read(Reg.CMDQ_PROD)
        self._output_cons = {reg: regs.read(reg) for reg in _OUTPUT_QUEUES}
        self._dma_reported: set[Location] = set()  # unacknowledged writes a DMA was reported for
        # Index registers whose last move was reported: the queue is inconsistent until a good move.
        self._broken_index: set[Reg] = set()

    # -- acknowledgements (trace "reg.update") -----------------------------------------------------
    def updated(self, reg: str) -> None:
        if reg == Reg.CR0ACK.name:
            self._cr0_pending = None
        elif reg == Reg.IRQ_CTRLACK.name:
            self._irq_ctrl_pending = None
        elif reg == Reg.GBPA.name:
            self._gbpa_pending = None

    # -- register writes ---------------------------------------------------------------------------
    def write(self, access: Access, where: Location) -> None:
        if access.aborted or not isinstance(access.value, int):
            return
        located = REG_AT.get(access.address - self.smmu.base)
        if located is None or access.size not in (4, 8):
            return
        reg, upper = located
        if access.size == 8 and (upper or REG_SIZE[reg] != 8):
            return  # RAZ/WI
        value = access.value << 32 if upper else access.value
        if reg is Reg.CR0:
            self._write_cr0(value, where)
        elif reg is Reg.IRQ_CTRL:
            self._write_irq_ctrl(value, where)
        elif reg is Reg.GBPA:
            self._write_gbpa(value, where)
        elif reg is Reg.CR1:
            self._write_cr1(value, where)
        elif reg is Reg.CMDQ_PROD:
            self._write_cmdq_prod(value, where)
        elif reg in _OUTPUT_QUEUES:
            self._write_output_cons(reg, value, where)
        if reg in _CR0_GUARDED:
            enable = _CR0_GUARDED[reg]
            if self._enables() & enable:
                self._guarded(reg.name, _CR0_NAMES[enable], where)
        elif reg in _IRQ_GUARDED:
            regs = self.smmu.regs
            if (regs.irq_ctrl | regs.irq_ctrlack) & _IRQ_GUARDED[reg]:
                self._guarded(reg.name, "its IRQ_CTRL enable", where)

    def _enables(self) -> int:
        regs = self.smmu.regs
        return regs.cr0 | regs.cr0ack

    def _add(self, check: Check, structure: str, message: str, writer: Location, at: Location) -> None:
        self.run.add(SanitizerReport(check, self.smmu.name, structure, message, writer, at))

    def _guarded(self, reg: str, enable: str, where: Location) -> None:
        self._add(Check.GUARDED_WRITE, reg, f"written while {enable} (or its ACK) is set", where, where)

    def _write_cr0(self, value: int, where: Location) -> None:
        pending = self._cr0_pending
        if pending is not None and (value ^ self._cr0) & _MASK32:
            self._add(
                Check.BEFORE_ACK,
                Reg.CR0.name,
                f"written ({value:#x}) before CR0ACK acknowledged the write at seq {pending.seq}",
                where,
                pending,
            )
        if value != self._cr0 or pending is not None:
            self._cr0_pending = where
        self._cr0 = value

    def _write_irq_ctrl(self, value: int, where: Location) -> None:
        pending = self._irq_ctrl_pending
        if pending is not None and value != self._irq_ctrl:
            self._add(
                Check.BEFORE_ACK,
                Reg.IRQ_CTRL.name,
                f"written ({value:#x}) before IRQ_CTRLACK acknowledged the write at seq {pending.seq}",
                where,
                pending,
            )
        if value != self._irq_ctrl or pending is not None:
            self._irq_ctrl_pending = where
        self._irq_ctrl = value

    def _write_gbpa(self, value: int, where: Location) -> None:
        pending = self._gbpa_pending
        if pending is not None:
            self._add(
                Check.GUARDED_WRITE,
                Reg.GBPA.name,
                f"written while the update written at seq {pending.seq} is pending (UPDATE=1)",
                where,
                pending,
            )
        elif not value & _GBPA_UPDATE:
            self._add(Check.GUARDED_WRITE, Reg.GBPA.name, "written with UPDATE=0: ignored", where, where)
        else:
            self._gbpa_pending = where

    def _write_cr1(self, value: int, where: Location) -> None:
        current = self.smmu.regs.read(Reg.CR1)
        enables = self._enables()
        if enables & _QUEUE_ENABLES and (value ^ current) & _CR1_QUEUE:
            self._guarded("CR1.QUEUE_*", "a queue enable", where)
        if enables & _SMMUEN and (value ^ current) & _CR1_TABLE:
            self._guarded("CR1.TABLE_*", "SMMUEN", where)

    def _write_cmdq_prod(self, value: int, where: Location) -> None:
        regs = self.smmu.regs
        log2 = regs.queue_log2size(Reg.CMDQ_BASE)
        index_mask = (2 << log2) - 1
        if value & _MASK32 & ~index_mask:
            self._add(
                Check.QUEUE_INDEX,
                Reg.CMDQ_PROD.name,
                f"{value:#x} sets bits above the {log2 + 1}-bit index (LOG2SIZE={log2})",
                where,
                where,
            )
        cr0, ack = regs.cr0, regs.cr0ack
        if (cr0 ^ ack) & _CMDQEN:
            self._add(
                Check.BEFORE_ACK,
                Reg.CMDQ_PROD.name,
                f"written while the CMDQEN change to {int(bool(cr0 & _CMDQEN))} is not acknowledged "
                f"(CR0ACK.CMDQEN={int(bool(ack & _CMDQEN))})",
                where,
                self._cr0_pending or where,
            )
        old, new = self._cmdq_prod & index_mask, value & index_mask
        self._cmdq_prod = new
        if not (cr0 | ack) & _CMDQEN:
            return  # software owns both indexes of a disabled queue
        cons = CMDQ_CONS.RD.get(regs.read(Reg.CMDQ_CONS))
        forward = (new - old) & index_mask
        if forward > 1 << log2:
            message = f"moved backwards ({old:#x} -> {new:#x})"
        elif forward > q_space(old, cons, log2):
            message = (
                f"moved past full ({old:#x} -> {new:#x} with CONS {cons:#x}): "
                "commands not yet consumed are overwritten"
            )
        else:
            message = ""
        self._index_moved(Reg.CMDQ_PROD, message, where)

    def _write_output_cons(self, reg: Reg, value: int, where: Location) -> None:
        base, prod_reg, enable, flags = _OUTPUT_QUEUES[reg]
        regs = self.smmu.regs
        log2 = regs.queue_log2size(base)
        index_mask = (2 << log2) - 1
        if value & _MASK32 & ~(index_mask | flags):
            self._add(
                Check.QUEUE_INDEX,
                reg.name,
                f"{value:#x} sets bits above the {log2 + 1}-bit index (LOG2SIZE={log2})",
                where,
                where,
            )
        old, new = self._output_cons[reg] & index_mask, value & index_mask
        self._output_cons[reg] = new
        if not self._enables() & enable:
            return
        prod = EVENTQ_PROD.WR.get(regs.read(prod_reg)) & index_mask
        forward = (new - old) & index_mask
        if forward > 1 << log2:
            message = f"moved backwards ({old:#x} -> {new:#x})"
        elif forward > q_used(prod, old, log2):
            message = (
                f"moved past PROD ({old:#x} -> {new:#x} with PROD {prod:#x}): records not yet written "
                "are consumed"
            )
        else:
            message = ""
        self._index_moved(reg, message, where)

    def _index_moved(self, reg: Reg, misuse: str, where: Location) -> None:
        """Report a bad move, once until the index moves well again (every move of a queue left
        inconsistent is bad in the same way)."""
        if not misuse:
            self._broken_index.discard(reg)
        elif reg not in self._broken_index:
            self._broken_index.add(reg)
            self._add(Check.QUEUE_INDEX, reg.name, misuse, where, where)

    # -- DMA -----------------------------------------------------------------------------------------
    def translation(self, at: Location) -> None:
        regs = self.smmu.regs
        cr0, ack = regs.cr0, regs.cr0ack
        pending = self._cr0_pending
        if (cr0 ^ ack) & (_SMMUEN | _ATSCHK) and pending is not None and pending not in self._dma_reported:
            self._dma_reported.add(pending)
            field = "SMMUEN" if (cr0 ^ ack) & _SMMUEN else "ATSCHK"
            self._add(
                Check.BEFORE_ACK,
                f"CR0.{field}",
                f"a DMA was translated while the {field} change written at seq {pending.seq} "
                "was not acknowledged",
                pending,
                at,
            )
        gbpa = self._gbpa_pending
        if not ack & _SMMUEN and gbpa is not None and gbpa not in self._dma_reported:
            self._dma_reported.add(gbpa)
            self._add(
                Check.BEFORE_ACK,
                Reg.GBPA.name,
                f"a DMA bypassed the disabled SMMU while the GBPA update written at seq {gbpa.seq} "
                "was pending",
                gbpa,
                at,
            )


__all__ = ["REG_AT", "RegisterCheck"]
