"""Interrupt lines, the MSI doorbell, and how the SMMU's sources reach them (IHI 0070 §3.18)."""

from __future__ import annotations

from pkvm_smmu.arch.events import EventType, build_event
from pkvm_smmu.arch.registers import CR0, EVENTQ_BASE, GERROR, IRQ_CTRL, Reg
from pkvm_smmu.machine.bus import HYP_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.irq import InterruptController, MsiDoorbell, msi_line
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuOptions, SmmuV3

BASE = 0x1000_0000
DOORBELL = 0x2000_0000
TRANSLATER = DOORBELL + MsiDoorbell.TRANSLATER
RAM = 0x8000_0000


def test_pulse_counts_per_line_and_calls_handlers_with_the_line() -> None:
    irq = InterruptController()
    seen: list[str] = []
    irq.connect("a", seen.append)
    irq.connect("a", lambda line: seen.append(line.upper()))
    irq.pulse("a")
    irq.pulse("a")
    irq.pulse("b")
    assert seen == ["a", "A", "a", "A"]
    assert irq.count("a") == 2 and irq.count("b") == 1 and irq.count("c") == 0
    assert irq.counts == {"a": 2, "b": 1}


def test_disconnected_handler_is_not_called() -> None:
    irq = InterruptController()
    seen: list[str] = []
    irq.connect("a", seen.append)
    irq.disconnect("a", seen.append)
    irq.disconnect("never", seen.append)
    irq.pulse("a")
    assert seen == [] and irq.count("a") == 1


def test_doorbell_write_raises_the_msi_named_by_its_data() -> None:
    bus = SystemBus()
    irq = InterruptController()
    doorbell = MsiDoorbell(irq)
    doorbell.map(bus, DOORBELL)
    assert bus.write(HYP_CPU, TRANSLATER, 4, 0x2A) is None
    assert bus.write(HYP_CPU, TRANSLATER, 2, 0x2B) is None
    assert irq.count(msi_line(0x2A)) == 1 and irq.count(msi_line(0x2B)) == 1
    assert doorbell.received == [("hyp", 0x2A), ("hyp", 0x2B)]


def test_doorbell_ignores_other_offsets_and_reads_as_zero() -> None:
    bus = SystemBus()
    irq = InterruptController()
    MsiDoorbell(irq).map(bus, DOORBELL)
    bus.write(HYP_CPU, DOORBELL, 4, 1)
    bus.write(HYP_CPU, TRANSLATER, 8, 1)
    bus.write(HYP_CPU, TRANSLATER + 4, 4, 1)
    assert irq.counts == {}
    assert bus.read(HYP_CPU, TRANSLATER, 4) == 0


def _smmu(irq: InterruptController | None, **options: object) -> SmmuV3:
    bus = SystemBus()
    bus.add_ram(RAM, 1 << 20)
    if irq is not None:
        MsiDoorbell(irq).map(bus, DOORBELL)
    opts = SmmuOptions(**options)  # type: ignore[arg-type]
    return SmmuV3("smmu7", bus, Clock(), SmmuFeatures(), BASE, irq=irq, options=opts)


def _write(smmu: SmmuV3, reg: int, value: int, size: int = 4) -> None:
    smmu.bus.write(HYP_CPU, BASE + reg, size, value)
    smmu.clock.advance(1000)


def test_gerror_msi_and_wired_line_both_fire_when_configured() -> None:
    irq = InterruptController()
    smmu = _smmu(irq)
    _write(smmu, Reg.GERROR_IRQ_CFG0, TRANSLATER, 8)
    _write(smmu, Reg.GERROR_IRQ_CFG1, 0x99)
    _write(smmu, Reg.IRQ_CTRL, IRQ_CTRL.encode(GERROR_IRQEN=1))
    smmu.interrupts.raise_gerror(GERROR.encode(SFM_ERR=1))
    assert irq.count(msi_line(0x99)) == 1
    assert irq.count("smmu7.gerror") == 1


def test_gerror_with_address_zero_sends_no_msi() -> None:
    irq = InterruptController()
    smmu = _smmu(irq)
    _write(smmu, Reg.GERROR_IRQ_CFG1, 0x99)
    _write(smmu, Reg.IRQ_CTRL, IRQ_CTRL.encode(GERROR_IRQEN=1))
    smmu.interrupts.raise_gerror(GERROR.encode(SFM_ERR=1))
    assert irq.counts == {"smmu7.gerror": 1}
    assert smmu.regs.gerror_active_bits == GERROR.encode(SFM_ERR=1)  # no MSI, so no MSI abort


def test_disabled_gerror_interrupt_does_not_fire() -> None:
    irq = InterruptController()
    smmu = _smmu(irq)
    smmu.interrupts.raise_gerror(GERROR.encode(CMDQ_ERR=1))
    assert irq.counts == {}


def test_eventq_msi_through_the_doorbell_without_wired_lines() -> None:
    irq = InterruptController()
    smmu = _smmu(irq, wired_irqs=False)
    _write(smmu, Reg.EVENTQ_IRQ_CFG0, TRANSLATER, 8)
    _write(smmu, Reg.EVENTQ_IRQ_CFG1, 0x31)
    _write(smmu, Reg.IRQ_CTRL, IRQ_CTRL.encode(EVENTQ_IRQEN=1))
    _write(smmu, Reg.EVENTQ_BASE, EVENTQ_BASE.encode(ADDR=RAM >> 5, LOG2SIZE=4), 8)
    _write(smmu, Reg.CR0, CR0.encode(EVENTQEN=1))
    assert smmu.record_event(build_event(EventType.F_UUT, SID=1))
    assert irq.counts == {msi_line(0x31): 1}


def test_smmu_without_interrupt_controller_still_signals_msis() -> None:
    smmu = _smmu(None)
    _write(smmu, Reg.GERROR_IRQ_CFG0, RAM + 0x100, 8)
    _write(smmu, Reg.GERROR_IRQ_CFG1, 0x77)
    _write(smmu, Reg.IRQ_CTRL, IRQ_CTRL.encode(GERROR_IRQEN=1))
    smmu.interrupts.raise_gerror(GERROR.encode(SFM_ERR=1))
    assert smmu.bus.read(HYP_CPU, RAM + 0x100, 4) == 0x77
