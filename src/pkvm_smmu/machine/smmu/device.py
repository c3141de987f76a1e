"""``SmmuV3``: one SMMUv3 instance on the system bus, wiring its register file, queues, command
executor, configuration cache, TLB and translator together.

The register file is the single source of truth for programming state; the effective state of a
CR0 field is its CR0ACK value. Disabling SMMUEN leaves the caches as they are: only invalidation
commands remove entries, and the configuration and translation code inserts nothing while
SMMUEN=0.
"""

from __future__ import annotations

from pkvm_smmu.arch.registers import CR0, SMMU_MMIO_SIZE, Reg
from pkvm_smmu.machine.bus import ExternalAbort, Initiator, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.irq import InterruptController
from pkvm_smmu.machine.smmu.config import ConfigCache
from pkvm_smmu.machine.smmu.executor import AtcClient, CommandExecutor
from pkvm_smmu.machine.smmu.features import SmmuFeatures
from pkvm_smmu.machine.smmu.options import SmmuOptions
from pkvm_smmu.machine.smmu.queues import CommandQueue, EventQueue, SmmuInterrupts
from pkvm_smmu.machine.smmu.registers import SmmuRegisters
from pkvm_smmu.machine.smmu.tlb import Tlb
from pkvm_smmu.machine.smmu.translate import AtsResponse, Translator
from pkvm_smmu.machine.smmu.types import Transaction, TranslationResult
from pkvm_smmu.trace.bus import TraceBus

_SMMUEN = CR0.SMMUEN.in_place_mask
_CMDQEN = CR0.CMDQEN.in_place_mask


class SmmuV3:
    """An SMMUv3 (Non-secure programming interface) mapped at ``base`` on ``bus``."""

    def __init__(
        self,
        name: str,
        bus: SystemBus,
        clock: Clock,
        features: SmmuFeatures,
        base: int,
        trace: TraceBus | None = None,
        irq: InterruptController | None = None,
        options: SmmuOptions | None = None,
    ) -> None:
        self.name = name
        self.bus = bus
        self.clock = clock
        self.features = features
        self.base = base
        self.options = options if options is not None else SmmuOptions()
        self.trace = trace if trace is not None else TraceBus(lambda: clock.now_ns)
        self.irq = irq
        # WFE wake-up events sent (CMD_SYNC with SIG_SEV, command queue no longer full).
        self.sev_count = 0
        self.ats_endpoints: dict[int, AtcClient] = {}
        self.regs = SmmuRegisters(name, features, clock, self.options, self, self.trace)
        self.interrupts = SmmuInterrupts(self)
        self.evtq = EventQueue(self)
        self.cmdq = CommandQueue(self)
        self.executor = CommandExecutor(self)
        self.config_cache = ConfigCache(self)
        self.tlb = Tlb(self.options.tlb_capacity)
        self.translator = Translator(self)
        bus.add_mmio(base, SMMU_MMIO_SIZE, self, name)

    # ---- MmioDevice --------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int, initiator: Initiator) -> int | ExternalAbort:
        return self.regs.mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int, initiator: Initiator) -> ExternalAbort | None:
        self.regs.mmio_write(offset, size, value)
        return None

    # ---- RegisterListener --------------------------------------------------------------------
    def cr0_updated(self, old: int, new: int) -> None:
        if (old ^ new) & _CMDQEN:
            if new & _CMDQEN:
                self.cmdq.kick()
            else:
                self.cmdq.stop()

    def irq_ctrl_updated(self, old: int, new: int) -> None:
        pass  # enables are read when a source fires

    def gbpa_updated(self, value: int) -> None:
        pass  # read through ``gbpa`` by the translator

    def cmdq_prod_written(self) -> None:
        self.cmdq.kick()

    def gerror_acknowledged(self, bits: int) -> None:
        self.cmdq.kick()  # acknowledging CMDQ_ERR restarts consumption from CONS

    # ---- state the rest of the model reads ---------------------------------------------------
    @property
    def smmu_enabled(self) -> bool:
        return bool(self.regs.cr0ack & _SMMUEN)

    @property
    def atschk(self) -> bool:
        return bool(CR0.ATSCHK.get(self.regs.cr0ack))

    @property
    def eventq_enabled(self) -> bool:
        return bool(CR0.EVENTQEN.get(self.regs.cr0ack))

    @property
    def gbpa(self) -> int:
        """The GBPA attributes in effect (an update takes effect when UPDATE clears)."""
        return self.regs.gbpa_effective

    @property
    def strtab_base(self) -> int:
        return self.regs.read(Reg.STRTAB_BASE)

    @property
    def strtab_base_cfg(self) -> int:
        return self.regs.read(Reg.STRTAB_BASE_CFG)

    @property
    def cr2(self) -> int:
        return self.regs.read(Reg.CR2)

    def record_event(self, record: int) -> bool:
        """Offer an event record to the event queue; False if it was discarded."""
        return self.evtq.record(record)

    def signal_sev(self) -> None:
        self.sev_count += 1
        if self.trace.enabled:
            self.trace.emit(self.name, "sev", count=self.sev_count)

    # ---- translation (delegated) -------------------------------------------------------------
    def translate(self, txn: Transaction) -> TranslationResult:
        return self.translator.translate(txn)

    def dma_read(self, txn: Transaction) -> bytes | TranslationResult:
        return self.translator.dma_read(txn)

    def dma_write(self, txn: Transaction, data: bytes) -> TranslationResult:
        return self.translator.dma_write(txn, data)

    def ats_request(
        self, sid: int, ssid: int | None, address: int, is_write: bool, privileged: bool = False
    ) -> AtsResponse:
        return self.translator.ats_request(sid, ssid, address, is_write, privileged)
