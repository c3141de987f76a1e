"""The SMMU's Non-secure register file (Page 0 and Page 1) with its architected side effects
(IHI 0070 §6): ID registers, CR0/IRQ_CTRL Update and ACK, the GBPA one-write protocol, guarded
fields, the GERROR/GERRORN toggle protocol and the queue index registers.

CONSTRAINED UNPREDICTABLE choices made here:
- Accesses other than an aligned 32-bit access to a register (or to either half of a 64-bit one) or
  an aligned 64-bit access to a 64-bit register are RAZ/WI, never an abort.
- Re-writing CR0 or IRQ_CTRL before the previous Update completed: the newest value wins, and the
  Update completes ``register_update_ns`` after the latest write.
- Toggling GERRORN for an error that is not active is ignored.
- Page 0 offsets 0xA8/0xAC/0xC8/0xCC and undefined Page 1 offsets are RAZ/WI unless
  ``SmmuOptions.page1_alias_page0`` makes the two pages full aliases.
- A write to CMDQ_CONS while the queue is disabled also sets ERR (the field is UNKNOWN until an
  error is reported anyway).
- Reset values the architecture leaves UNKNOWN are 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pkvm_smmu.arch.registers import (
    CMDQ_BASE,
    CMDQ_CONS,
    CR0,
    CR1,
    CR2,
    EVENTQ_BASE,
    EVENTQ_CONS,
    EVENTQ_PROD,
    GBPA,
    GERROR,
    IDR0,
    IRQ_CFG0,
    IRQ_CFG2,
    IRQ_CTRL,
    PAGE1_OFFSET,
    PRIQ_BASE,
    REG_SIZE,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    Reg,
)
from pkvm_smmu.machine.clock import Clock, _Timer
from pkvm_smmu.machine.smmu.features import SmmuFeatures
from pkvm_smmu.machine.smmu.options import SmmuOptions
from pkvm_smmu.trace.bus import TraceBus

_MASK32 = 0xFFFF_FFFF
_MASK64 = (1 << 64) - 1

# 4-byte-aligned offset -> (register, half): half 1 is the upper word of a 64-bit register.
_REG_AT: dict[int, tuple[Reg, int]] = {}
for _reg in Reg:
    _REG_AT[int(_reg)] = (_reg, 0)
    if REG_SIZE[_reg] == 8:
        _REG_AT[int(_reg) + 4] = (_reg, 1)
_PAGE1_ONLY = frozenset({0x0A8, 0x0AC, 0x0C8, 0x0CC})

_QUEUE_INDEX = {
    # index register -> (its queue's BASE register, bits above the index it keeps)
    Reg.CMDQ_PROD: (Reg.CMDQ_BASE, 0),
    Reg.CMDQ_CONS: (Reg.CMDQ_BASE, CMDQ_CONS.ERR.in_place_mask),
    Reg.EVENTQ_PROD: (Reg.EVENTQ_BASE, EVENTQ_PROD.OVFLG.in_place_mask),
    Reg.EVENTQ_CONS: (Reg.EVENTQ_BASE, EVENTQ_CONS.OVACKFLG.in_place_mask),
    Reg.PRIQ_PROD: (Reg.PRIQ_BASE, EVENTQ_PROD.OVFLG.in_place_mask),
    Reg.PRIQ_CONS: (Reg.PRIQ_BASE, EVENTQ_CONS.OVACKFLG.in_place_mask),
}

_SMMUEN = CR0.SMMUEN.in_place_mask
_CMDQEN = CR0.CMDQEN.in_place_mask
_EVENTQEN = CR0.EVENTQEN.in_place_mask
_PRIQEN = CR0.PRIQEN.in_place_mask
_CR1_QUEUE = CR1.QUEUE_IC.in_place_mask | CR1.QUEUE_OC.in_place_mask | CR1.QUEUE_SH.in_place_mask
_CR1_TABLE = CR1.TABLE_IC.in_place_mask | CR1.TABLE_OC.in_place_mask | CR1.TABLE_SH.in_place_mask
_GBPA_UPDATE = GBPA.UPDATE.in_place_mask


class RegisterListener(Protocol):
    """What the rest of the SMMU needs to hear from its register file."""

    def cr0_updated(self, old: int, new: int) -> None: ...

    def irq_ctrl_updated(self, old: int, new: int) -> None: ...

    def gbpa_updated(self, value: int) -> None: ...

    def cmdq_prod_written(self) -> None: ...

    def gerror_acknowledged(self, bits: int) -> None: ...


def _coresight_ids(features: SmmuFeatures) -> dict[Reg, int]:
    """PIDR/CIDR from the IIDR identity (JEP106 code and part number)."""
    jep_id = features.implementer & 0x7F
    jep_cont = (features.implementer >> 8) & 0xF
    part = features.product_id & 0xFFF
    return {
        Reg.PIDR0: part & 0xFF,
        Reg.PIDR1: (part >> 8) | (jep_id & 0xF) << 4,
        Reg.PIDR2: (jep_id >> 4) | 1 << 3,  # JEDEC-assigned identity
        Reg.PIDR4: jep_cont,
        Reg.CIDR0: 0x0D,
        Reg.CIDR1: 0xF0,
        Reg.CIDR2: 0x05,
        Reg.CIDR3: 0xB1,
    }


class SmmuRegisters:
    """Register state and the behaviour of software accesses to it."""

    def __init__(
        self,
        name: str,
        features: SmmuFeatures,
        clock: Clock,
        options: SmmuOptions,
        listener: RegisterListener,
        trace: TraceBus,
    ) -> None:
        self.name = name
        self.features = features
        self.clock = clock
        self.options = options
        self.listener = listener
        self.trace = trace
        idr0 = features.idr0()
        self._const: dict[Reg, int] = {
            Reg.IDR0: idr0,
            Reg.IDR1: features.idr1(),
            Reg.IDR2: 0,
            Reg.IDR3: features.idr3(),
            Reg.IDR4: 0,
            Reg.IDR5: features.idr5(),
            Reg.IIDR: features.iidr(),
            Reg.AIDR: features.aidr(),
            Reg.STATUSR: 0,  # never claims DORMANT
            **_coresight_ids(features),
        }
        self._v: dict[Reg, int] = {Reg.GBPA: options.gbpa_reset}
        self.gbpa_effective = options.gbpa_reset
        self._cr0_timer: _Timer | None = None
        self._irq_ctrl_timer: _Timer | None = None
        self._oas_mask = (1 << features.oas_bits) - 1
        self._writers = self._build_writers(idr0)

    # ---- software accesses ----------------------------------------------------------------------
    def _locate(self, offset: int, size: int) -> tuple[Reg, int, int] | None:
        """(register, shift, mask) an access selects, or None for RAZ/WI."""
        if offset < 0 or offset >= 2 * PAGE1_OFFSET:
            return None
        if self.options.page1_alias_page0:
            low = offset & (PAGE1_OFFSET - 1)
            offset = low | PAGE1_OFFSET if low in _PAGE1_ONLY else low
        if size == 4 and offset % 4 == 0:
            entry = _REG_AT.get(offset)
            if entry is not None:
                return entry[0], 32 * entry[1], _MASK32
        elif size == 8 and offset % 8 == 0:
            entry = _REG_AT.get(offset)
            if entry is not None and entry[1] == 0 and REG_SIZE[entry[0]] == 8:
                return entry[0], 0, _MASK64
        return None

    def mmio_read(self, offset: int, size: int) -> int:
        where = self._locate(offset, size)
        if where is None:
            return 0
        reg, shift, mask = where
        return (self.read(reg) >> shift) & mask

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        where = self._locate(offset, size)
        if where is None:
            return
        reg, shift, mask = where
        value &= mask
        if mask != _MASK64 and REG_SIZE[reg] == 8:
            value = (self.read(reg) & ~(mask << shift) & _MASK64) | value << shift
        self.write(reg, value)

    def read(self, reg: Reg) -> int:
        """The value software reads from ``reg``."""
        const = self._const.get(reg)
        if const is not None:
            return const
        value = self._v.get(reg, 0)
        index = _QUEUE_INDEX.get(reg)
        if index is not None:
            value &= self._index_mask(index[0]) | index[1]
        return value

    def write(self, reg: Reg, value: int) -> None:
        """A software write of the whole register."""
        writer = self._writers.get(reg)
        accepted = writer is not None and writer(reg, value)
        if self.trace.enabled:
            self.trace.emit(self.name, "reg.write", reg=reg.name, value=value, ignored=not accepted)

    # ---- per-register write behaviour -----------------------------------------------------------
    def _build_writers(self, idr0: int) -> dict[Reg, Callable[[Reg, int], bool]]:
        f = self.features
        pri = f.pri
        cr0_mask = _SMMUEN | _EVENTQEN | _CMDQEN
        cr0_mask |= _PRIQEN if pri else 0
        cr0_mask |= CR0.ATSCHK.in_place_mask if f.ats else 0
        cr2_mask = CR2.RECINVSID.in_place_mask
        cr2_mask |= CR2.E2H.in_place_mask if f.hyp else 0
        cr2_mask |= CR2.PTM.in_place_mask if IDR0.BTM.get(idr0) else 0
        self._cr0_mask = cr0_mask
        self._irq_ctrl_mask = (
            IRQ_CTRL.GERROR_IRQEN.in_place_mask
            | IRQ_CTRL.EVENTQ_IRQEN.in_place_mask
            | (IRQ_CTRL.PRIQ_IRQEN.in_place_mask if pri else 0)
        )
        oas = self._oas_mask
        smmuen = self._guard(_SMMUEN)
        writers: dict[Reg, Callable[[Reg, int], bool]] = {
            Reg.CR0: self._write_cr0,
            Reg.CR1: self._write_cr1,
            Reg.CR2: self._store(cr2_mask, smmuen),
            Reg.GBPA: self._write_gbpa,
            Reg.IRQ_CTRL: self._write_irq_ctrl,
            Reg.GERRORN: self._write_gerrorn,
            Reg.STRTAB_BASE: self._store(
                STRTAB_BASE.RA.in_place_mask | STRTAB_BASE.ADDR.in_place_mask & oas, smmuen
            ),
            Reg.STRTAB_BASE_CFG: self._store(STRTAB_BASE_CFG.DEFINED_MASK, smmuen),
            Reg.CMDQ_BASE: self._store(_queue_base_mask(CMDQ_BASE, oas), self._guard(_CMDQEN)),
            Reg.CMDQ_PROD: self._write_cmdq_prod,
            Reg.CMDQ_CONS: self._store_index(self._guard(_CMDQEN)),
            Reg.EVENTQ_BASE: self._store(_queue_base_mask(EVENTQ_BASE, oas), self._guard(_EVENTQEN)),
            Reg.EVENTQ_PROD: self._store_index(self._guard(_EVENTQEN)),
            Reg.EVENTQ_CONS: self._store_index(None),
        }
        if pri:
            writers[Reg.PRIQ_BASE] = self._store(_queue_base_mask(PRIQ_BASE, oas), self._guard(_PRIQEN))
            writers[Reg.PRIQ_PROD] = self._store_index(self._guard(_PRIQEN))
            writers[Reg.PRIQ_CONS] = self._store_index(None)
        if f.msi:
            sources = [
                (Reg.GERROR_IRQ_CFG0, Reg.GERROR_IRQ_CFG1, Reg.GERROR_IRQ_CFG2, IRQ_CTRL.GERROR_IRQEN),
                (Reg.EVENTQ_IRQ_CFG0, Reg.EVENTQ_IRQ_CFG1, Reg.EVENTQ_IRQ_CFG2, IRQ_CTRL.EVENTQ_IRQEN),
            ]
            if pri:
                sources.append((Reg.PRIQ_IRQ_CFG0, Reg.PRIQ_IRQ_CFG1, Reg.PRIQ_IRQ_CFG2, IRQ_CTRL.PRIQ_IRQEN))
            for cfg0, cfg1, cfg2, enable in sources:
                guard = self._irq_guard(enable.in_place_mask)
                cfg2_mask = IRQ_CFG2.MEMATTR.in_place_mask | IRQ_CFG2.SH.in_place_mask
                if cfg2 is Reg.PRIQ_IRQ_CFG2:
                    cfg2_mask |= IRQ_CFG2.LO.in_place_mask
                writers[cfg0] = self._store(IRQ_CFG0.ADDR.in_place_mask & oas, guard)
                writers[cfg1] = self._store(_MASK32, guard)
                writers[cfg2] = self._store(cfg2_mask, guard)
        return writers

    def _guard(self, cr0_bits: int) -> Callable[[], bool]:
        """True while the enable (or its ACK) is set: guarded fields then ignore writes (v3.2+)."""
        return lambda: bool((self.cr0 | self.cr0ack) & cr0_bits)

    def _irq_guard(self, irq_bits: int) -> Callable[[], bool]:
        return lambda: bool((self.irq_ctrl | self.irq_ctrlack) & irq_bits)

    def _store(self, mask: int, guard: Callable[[], bool] | None) -> Callable[[Reg, int], bool]:
        def store(reg: Reg, value: int) -> bool:
            if guard is not None and guard():
                return False
            self._v[reg] = value & mask
            return True

        return store

    def _store_index(self, guard: Callable[[], bool] | None) -> Callable[[Reg, int], bool]:
        def store(reg: Reg, value: int) -> bool:
            if guard is not None and guard():
                return False
            base, flags = _QUEUE_INDEX[reg]
            self._v[reg] = value & (self._index_mask(base) | flags)
            return True

        return store

    def _write_cmdq_prod(self, reg: Reg, value: int) -> bool:
        self._v[reg] = value & self._index_mask(Reg.CMDQ_BASE)
        self.listener.cmdq_prod_written()
        return True

    def _write_cr0(self, reg: Reg, value: int) -> bool:
        self._v[Reg.CR0] = value & self._cr0_mask
        if self._cr0_timer is not None:
            Clock.cancel(self._cr0_timer)
        self._cr0_timer = self.clock.call_after(self.options.register_update_ns, self._complete_cr0)
        return True

    def _complete_cr0(self) -> None:
        self._cr0_timer = None
        old = self.cr0ack
        self._v[Reg.CR0ACK] = new = self.cr0
        self._trace_update(Reg.CR0ACK, new)
        self.listener.cr0_updated(old, new)

    def _write_cr1(self, reg: Reg, value: int) -> bool:
        writable = 0
        enables = self.cr0 | self.cr0ack
        if not enables & (_CMDQEN | _EVENTQEN | _PRIQEN):
            writable |= _CR1_QUEUE
        if not enables & _SMMUEN:
            writable |= _CR1_TABLE
        self._v[reg] = (self._v.get(reg, 0) & ~writable) | (value & writable)
        return writable != 0

    def _write_irq_ctrl(self, reg: Reg, value: int) -> bool:
        self._v[Reg.IRQ_CTRL] = value & self._irq_ctrl_mask
        if self._irq_ctrl_timer is not None:
            Clock.cancel(self._irq_ctrl_timer)
        self._irq_ctrl_timer = self.clock.call_after(self.options.register_update_ns, self._complete_irq_ctrl)
        return True

    def _complete_irq_ctrl(self) -> None:
        self._irq_ctrl_timer = None
        old = self.irq_ctrlack
        self._v[Reg.IRQ_CTRLACK] = new = self.irq_ctrl
        self._trace_update(Reg.IRQ_CTRLACK, new)
        self.listener.irq_ctrl_updated(old, new)

    def _write_gbpa(self, reg: Reg, value: int) -> bool:
        # One 32-bit write with UPDATE=1; anything else, or a write while an update is pending,
        # is IGNORED (SMMUv3.2+).
        if self._v[Reg.GBPA] & _GBPA_UPDATE or not value & _GBPA_UPDATE:
            return False
        self._v[Reg.GBPA] = value & GBPA.DEFINED_MASK
        self.clock.call_after(self.options.register_update_ns, self._complete_gbpa)
        return True

    def _complete_gbpa(self) -> None:
        value = self._v[Reg.GBPA] & ~_GBPA_UPDATE
        self._v[Reg.GBPA] = self.gbpa_effective = value
        self._trace_update(Reg.GBPA, value)
        self.listener.gbpa_updated(value)

    def _write_gerrorn(self, reg: Reg, value: int) -> bool:
        active = self.gerror_active_bits
        new = (self.gerrorn & ~active) | (value & active)
        acknowledged = active & ~(self.gerror ^ new)
        self._v[Reg.GERRORN] = new
        if acknowledged:
            self.listener.gerror_acknowledged(acknowledged)
        return True

    def _trace_update(self, reg: Reg, value: int) -> None:
        if self.trace.enabled:
            self.trace.emit(self.name, "reg.update", reg=reg.name, value=value)

    # ---- state the SMMU uses -----------------------------------------------------------------
    @property
    def cr0(self) -> int:
        return self._v.get(Reg.CR0, 0)

    @property
    def cr0ack(self) -> int:
        """The effective CR0: a field takes effect when its ACK does."""
        return self._v.get(Reg.CR0ACK, 0)

    @property
    def irq_ctrl(self) -> int:
        return self._v.get(Reg.IRQ_CTRL, 0)

    @property
    def irq_ctrlack(self) -> int:
        return self._v.get(Reg.IRQ_CTRLACK, 0)

    @property
    def gerror(self) -> int:
        return self._v.get(Reg.GERROR, 0)

    @property
    def gerrorn(self) -> int:
        return self._v.get(Reg.GERRORN, 0)

    @property
    def gerror_active_bits(self) -> int:
        return self.gerror ^ self.gerrorn

    def gerror_active(self, bits: int) -> bool:
        return bool(self.gerror_active_bits & bits)

    def gerror_activate(self, bits: int) -> int:
        """Toggle GERROR for each error in ``bits`` that is inactive; returns the newly active ones.

        Further occurrences of an active error are not logged.
        """
        newly = bits & GERROR.DEFINED_MASK & ~self.gerror_active_bits
        self._v[Reg.GERROR] = self.gerror ^ newly
        return newly

    def queue_log2size(self, base: Reg) -> int:
        """LOG2SIZE as used (capped at the IDR1 maximum; readback keeps the written value)."""
        f = self.features
        cap = {
            Reg.CMDQ_BASE: f.cmdq_log2_max,
            Reg.EVENTQ_BASE: f.eventq_log2_max,
            Reg.PRIQ_BASE: f.priq_log2_max,
        }[base]
        return min(CMDQ_BASE.LOG2SIZE.get(self._v.get(base, 0)), cap)

    def queue_address(self, base: Reg, entry_size: int) -> int:
        """The effective base: aligned to the queue's size in bytes, at least 32."""
        size = max(entry_size << self.queue_log2size(base), 32)
        return CMDQ_BASE.ADDR.get_address(self._v.get(base, 0)) & ~(size - 1)

    def _index_mask(self, base: Reg) -> int:
        return (2 << self.queue_log2size(base)) - 1

    def set_index(self, reg: Reg, value: int) -> None:
        """An SMMU-side update of a queue index register (CMDQ_CONS, EVENTQ_PROD)."""
        base, flags = _QUEUE_INDEX[reg]
        self._v[reg] = value & (self._index_mask(base) | flags)


def _queue_base_mask(layout: type[CMDQ_BASE] | type[EVENTQ_BASE], oas_mask: int) -> int:
    """Writable bits of a queue BASE register: ADDR bits above the OAS are not stored."""
    addr = layout.ADDR.in_place_mask
    return (layout.DEFINED_MASK & ~addr) | (addr & oas_mask)
