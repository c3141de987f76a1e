"""The command queue consumer, the event queue producer and interrupt signalling (IHI 0070 §3.5,
§4.1, §7.1, §7.2, §7.4, §3.18).

Every queue access and MSI is a physical access through the bus made by the SMMU itself, so
observers see each one. Queue and MSI addresses are truncated to the OAS (§3.4.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm_smmu.arch.commands import CMD_SIZE
from pkvm_smmu.arch.events import EVENT_SIZE, pretty_event
from pkvm_smmu.arch.queues import q_empty, q_full, q_inc, q_slot
from pkvm_smmu.arch.registers import (
    CMDQ_CONS,
    CR0,
    EVENTQ_CONS,
    EVENTQ_PROD,
    GERROR,
    IRQ_CFG0,
    IRQ_CFG1,
    IRQ_CTRL,
    CmdqError,
    Reg,
)
from pkvm_smmu.machine.bus import ExternalAbort, Initiator, InitiatorKind
from pkvm_smmu.machine.clock import Clock, _Timer

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

_CMDQEN = CR0.CMDQEN.in_place_mask
_EVENTQEN = CR0.EVENTQEN.in_place_mask
_CMDQ_ERR = GERROR.CMDQ_ERR.in_place_mask
_EVENTQ_ABT_ERR = GERROR.EVENTQ_ABT_ERR.in_place_mask
_MSI_GERROR_ABT_ERR = GERROR.MSI_GERROR_ABT_ERR.in_place_mask
_OVFLG = EVENTQ_PROD.OVFLG.in_place_mask
_MASK256 = (1 << 256) - 1


class SmmuInterrupts:
    """The SMMU's interrupt sources: a wired pulse (if implemented) and/or an MSI write."""

    GERROR = "gerror"
    EVENTQ = "eventq"
    PRIQ = "priq"
    CMD_SYNC = "cmd-sync"

    def __init__(self, smmu: SmmuV3) -> None:
        self.smmu = smmu
        self._msi_initiator = Initiator(InitiatorKind.SMMU, smmu.name, purpose="msi")
        self._oas_mask = (1 << smmu.features.oas_bits) - 1

    def line(self, source: str) -> str:
        """The wired line a source pulses on the interrupt controller."""
        return f"{self.smmu.name}.{source}"

    def raise_gerror(self, bits: int) -> None:
        """Activate global errors; the GERROR interrupt fires on activation of any but MSI_GERROR_ABT_ERR."""
        smmu = self.smmu
        regs = smmu.regs
        newly = regs.gerror_activate(bits)
        if not newly:
            return
        if smmu.trace.enabled:
            smmu.trace.emit(smmu.name, "gerror", bits=GERROR.pretty(newly))
        if newly & ~_MSI_GERROR_ABT_ERR and regs.irq_ctrlack & IRQ_CTRL.GERROR_IRQEN.in_place_mask:
            self._signal(self.GERROR, Reg.GERROR_IRQ_CFG0, Reg.GERROR_IRQ_CFG1, _MSI_GERROR_ABT_ERR)

    def eventq_nonempty(self) -> None:
        if self.smmu.regs.irq_ctrlack & IRQ_CTRL.EVENTQ_IRQEN.in_place_mask:
            self._signal(
                self.EVENTQ, Reg.EVENTQ_IRQ_CFG0, Reg.EVENTQ_IRQ_CFG1, GERROR.MSI_EVENTQ_ABT_ERR.in_place_mask
            )

    def cmd_sync(self, msi_address: int, msi_data: int) -> None:
        """A CMD_SYNC's SIG_IRQ completion signal (its MSI configuration is in the command)."""
        self._send(self.CMD_SYNC, msi_address, msi_data, GERROR.MSI_CMDQ_ABT_ERR.in_place_mask)

    def _signal(self, source: str, cfg0: Reg, cfg1: Reg, abort_bit: int) -> None:
        regs = self.smmu.regs
        address = IRQ_CFG0.ADDR.get_address(regs.read(cfg0))
        self._send(source, address, IRQ_CFG1.DATA.get(regs.read(cfg1)), abort_bit)

    def _send(self, source: str, msi_address: int, msi_data: int, abort_bit: int) -> None:
        smmu = self.smmu
        address = msi_address & self._oas_mask
        msi = smmu.features.msi and msi_address != 0
        if smmu.trace.enabled:
            smmu.trace.emit(smmu.name, "irq", source=source, msi=msi, address=address, data=msi_data)
        if msi:
            aborted = smmu.bus.write(self._msi_initiator, address, 4, msi_data & 0xFFFF_FFFF)
            if aborted is not None:
                self.raise_gerror(abort_bit)
        if smmu.options.wired_irqs and smmu.irq is not None:
            smmu.irq.pulse(self.line(source))


class CommandQueue:
    """Consumes commands, one per ``command_ns`` of modeled time, while the queue can be processed."""

    def __init__(self, smmu: SmmuV3) -> None:
        self.smmu = smmu
        self._timer: _Timer | None = None
        self._initiator = Initiator(InitiatorKind.SMMU, smmu.name, purpose="cmdq-fetch")
        self._oas_mask = (1 << smmu.features.oas_bits) - 1

    @property
    def log2size(self) -> int:
        return self.smmu.regs.queue_log2size(Reg.CMDQ_BASE)

    @property
    def prod(self) -> int:
        return self.smmu.regs.read(Reg.CMDQ_PROD)

    @property
    def cons(self) -> int:
        return CMDQ_CONS.RD.get(self.smmu.regs.read(Reg.CMDQ_CONS))

    def can_consume(self) -> bool:
        """Enabled (ACK), no CMDQ_ERR active, and not empty (§4.1.2)."""
        regs = self.smmu.regs
        return (
            bool(regs.cr0ack & _CMDQEN)
            and not regs.gerror_active(_CMDQ_ERR)
            and not q_empty(self.prod, self.cons, self.log2size)
        )

    def kick(self) -> None:
        """(Re)consider the queue: after a PROD write, CMDQEN enable, or a CMDQ_ERR acknowledgement."""
        if self._timer is None and self.can_consume():
            self._timer = self.smmu.clock.call_after(self.smmu.options.command_ns, self._step)

    def stop(self) -> None:
        if self._timer is not None:
            Clock.cancel(self._timer)
            self._timer = None

    def _step(self) -> None:
        self._timer = None
        if not self.can_consume():
            return
        smmu = self.smmu
        regs = smmu.regs
        qs = self.log2size
        prod, cons = self.prod, self.cons
        address = regs.queue_address(Reg.CMDQ_BASE, CMD_SIZE) & self._oas_mask
        address += q_slot(cons, qs) * CMD_SIZE
        data = smmu.bus.read_bytes(self._initiator, address, CMD_SIZE)
        if isinstance(data, ExternalAbort):
            self._fail(CmdqError.ABT, cons, address)
            return
        error = smmu.executor.execute(int.from_bytes(data, "little"))
        if error is not CmdqError.NONE:
            self._fail(error, cons, address)
            return
        err = regs.read(Reg.CMDQ_CONS) & CMDQ_CONS.ERR.in_place_mask
        regs.set_index(Reg.CMDQ_CONS, q_inc(cons, 1, qs) | err)
        # Completion signals are observable only once CONS has moved past the CMD_SYNC.
        smmu.executor.complete()
        if q_full(prod, cons, qs) and smmu.features.sev:
            smmu.signal_sev()  # the queue became non-full (§4.1.2)
        self.kick()

    def _fail(self, error: CmdqError, cons: int, address: int) -> None:
        """Stop on the failing command: ERR first, then GERROR.CMDQ_ERR (§7.1)."""
        smmu = self.smmu
        regs = smmu.regs
        regs.set_index(Reg.CMDQ_CONS, CMDQ_CONS.RD.insert(cons) | CMDQ_CONS.ERR.insert(error))
        if smmu.trace.enabled:
            smmu.trace.emit(smmu.name, "cmdq.error", error=error.name, cons=cons, address=address)
        smmu.interrupts.raise_gerror(_CMDQ_ERR)


class EventQueue:
    """Writes event records; discards them when the queue is not writable (§7.2.1, §7.4)."""

    def __init__(self, smmu: SmmuV3) -> None:
        self.smmu = smmu
        self._initiator = Initiator(InitiatorKind.SMMU, smmu.name, purpose="evtq-write")
        self._oas_mask = (1 << smmu.features.oas_bits) - 1

    @property
    def log2size(self) -> int:
        return self.smmu.regs.queue_log2size(Reg.EVENTQ_BASE)

    @property
    def prod(self) -> int:
        return EVENTQ_PROD.WR.get(self.smmu.regs.read(Reg.EVENTQ_PROD))

    @property
    def cons(self) -> int:
        return EVENTQ_CONS.RD.get(self.smmu.regs.read(Reg.EVENTQ_CONS))

    @property
    def overflow_pending(self) -> bool:
        regs = self.smmu.regs
        return EVENTQ_PROD.OVFLG.get(regs.read(Reg.EVENTQ_PROD)) != EVENTQ_CONS.OVACKFLG.get(
            regs.read(Reg.EVENTQ_CONS)
        )

    def writable(self) -> bool:
        regs = self.smmu.regs
        return (
            bool(regs.cr0ack & _EVENTQEN)
            and not regs.gerror_active(_EVENTQ_ABT_ERR)
            and not q_full(self.prod, self.cons, self.log2size)
        )

    def record(self, event: int) -> bool:
        """Write one (non-stall) record; False when it was discarded or its write aborted."""
        smmu = self.smmu
        regs = smmu.regs
        event &= _MASK256
        if not regs.cr0ack & _EVENTQEN or regs.gerror_active(_EVENTQ_ABT_ERR):
            self._trace("evtq.discard", event)
            return False
        qs = self.log2size
        prod_reg = regs.read(Reg.EVENTQ_PROD)
        prod, cons = EVENTQ_PROD.WR.get(prod_reg), self.cons
        if q_full(prod, cons, qs):
            # Overflow is flagged once; it stays pending until software copies OVFLG to OVACKFLG.
            overflow = not self.overflow_pending
            if overflow:
                regs.set_index(Reg.EVENTQ_PROD, prod_reg ^ _OVFLG)
            self._trace("evtq.overflow" if overflow else "evtq.discard", event)
            return False
        address = regs.queue_address(Reg.EVENTQ_BASE, EVENT_SIZE) & self._oas_mask
        address += q_slot(prod, qs) * EVENT_SIZE
        if smmu.bus.write_bytes(self._initiator, address, event.to_bytes(EVENT_SIZE, "little")) is not None:
            self._trace("evtq.abort", event)
            smmu.interrupts.raise_gerror(_EVENTQ_ABT_ERR)
            return False
        regs.set_index(Reg.EVENTQ_PROD, q_inc(prod, 1, qs) | (prod_reg & _OVFLG))
        self._trace("evtq.record", event)
        if q_empty(prod, cons, qs):
            smmu.interrupts.eventq_nonempty()
        return True

    def _trace(self, kind: str, event: int) -> None:
        trace = self.smmu.trace
        if trace.enabled:
            trace.emit(self.smmu.name, kind, event=pretty_event(event))
