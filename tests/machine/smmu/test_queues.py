"""Command queue consumption and errors, CMD_SYNC completion signals, event queue writes, overflow,
aborts and interrupts (IHI 0070 §3.5, §4.1, §4.7.3, §7.1, §7.2, §7.4, §3.18)."""

from __future__ import annotations

from pkvm_smmu.arch.commands import Opcode, build_command
from pkvm_smmu.arch.events import EventType, build_event
from pkvm_smmu.arch.registers import (
    CMDQ_BASE,
    CMDQ_CONS,
    CR0,
    EVENTQ_BASE,
    EVENTQ_CONS,
    EVENTQ_PROD,
    GERROR,
    IRQ_CTRL,
    CmdqError,
    Reg,
)
from pkvm_smmu.machine.bus import HYP_CPU, Access, ExternalAbort, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.irq import InterruptController, MsiDoorbell, msi_line
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuOptions, SmmuV3

BASE = 0x1000_0000
RAM = 0x8000_0000
CMDQ = RAM + 0x1_0000
EVTQ = RAM + 0x2_0000
MSI_TARGET = RAM + 0x3_0000
UNMAPPED = 0x4_0000_0000
DOORBELL = 0x2000_0000
CMD_NS = 50
UPDATE_NS = 100

SYNC = build_command(Opcode.SYNC)
NSNH_ALL = build_command(Opcode.TLBI_NSNH_ALL)
ILLEGAL = 0x00  # reserved opcode


class Rig:
    def __init__(self, features: SmmuFeatures | None = None, **options: object) -> None:
        self.bus = SystemBus()
        self.bus.add_ram(RAM, 1 << 24)
        self.clock = Clock()
        self.irq = InterruptController()
        MsiDoorbell(self.irq).map(self.bus, DOORBELL)
        opts = SmmuOptions(register_update_ns=UPDATE_NS, command_ns=CMD_NS, **options)  # type: ignore[arg-type]
        self.smmu = SmmuV3(
            "smmu0", self.bus, self.clock, features or SmmuFeatures(), BASE, irq=self.irq, options=opts
        )

    def rd(self, reg: int, size: int = 4) -> int:
        value = self.bus.read(HYP_CPU, BASE + reg, size)
        assert not isinstance(value, ExternalAbort)
        return value

    def wr(self, reg: int, value: int, size: int = 4) -> None:
        self.bus.write(HYP_CPU, BASE + reg, size, value)

    def control(self, reg: Reg, value: int) -> None:
        self.wr(reg, value)
        self.clock.advance(UPDATE_NS)

    # -- command queue -------------------------------------------------------------------------
    def setup_cmdq(self, log2size: int, base: int = CMDQ) -> None:
        self.log2size = log2size
        self.cmdq_base = base
        self.wr(Reg.CMDQ_BASE, CMDQ_BASE.encode(ADDR=base >> 5, LOG2SIZE=log2size), 8)
        self.wr(Reg.CMDQ_PROD, 0)
        self.wr(Reg.CMDQ_CONS, 0)
        self.control(Reg.CR0, self.rd(Reg.CR0) | CR0.encode(CMDQEN=1))

    def put(self, index: int, command: int) -> None:
        slot = index & ((1 << self.log2size) - 1)
        self.bus.write_bytes(HYP_CPU, self.cmdq_base + 16 * slot, command.to_bytes(16, "little"))

    def submit(self, *commands: int) -> None:
        prod = self.rd(Reg.CMDQ_PROD)
        for command in commands:
            self.put(prod, command)
            prod = (prod + 1) & ((2 << self.log2size) - 1)
        self.wr(Reg.CMDQ_PROD, prod)

    @property
    def cons(self) -> int:
        return CMDQ_CONS.RD.get(self.rd(Reg.CMDQ_CONS))

    @property
    def err(self) -> int:
        return CMDQ_CONS.ERR.get(self.rd(Reg.CMDQ_CONS))

    def run(self, commands: int = 64) -> None:
        self.clock.advance(commands * CMD_NS)

    # -- event queue ---------------------------------------------------------------------------
    def setup_evtq(self, log2size: int, base: int = EVTQ) -> None:
        self.evtq_log2size = log2size
        self.wr(Reg.EVENTQ_BASE, EVENTQ_BASE.encode(ADDR=base >> 5, LOG2SIZE=log2size), 8)
        self.wr(Reg.EVENTQ_PROD, 0)
        self.wr(Reg.EVENTQ_CONS, 0)
        self.control(Reg.CR0, self.rd(Reg.CR0) | CR0.encode(EVENTQEN=1))

    def event_at(self, slot: int) -> int:
        data = self.bus.read_bytes(HYP_CPU, EVTQ + 32 * slot, 32)
        assert isinstance(data, bytes)
        return int.from_bytes(data, "little")

    def gerror_active(self) -> int:
        return self.rd(Reg.GERROR) ^ self.rd(Reg.GERRORN)


def event(sid: int) -> int:
    return build_event(EventType.C_BAD_STE, SID=sid)


# ---- command consumption --------------------------------------------------------------------------


def test_commands_are_consumed_one_per_command_time() -> None:
    rig = Rig()
    rig.setup_cmdq(3)
    rig.submit(NSNH_ALL, NSNH_ALL, SYNC)
    assert rig.cons == 0  # nothing happens without modeled time
    rig.clock.advance(CMD_NS)
    assert rig.cons == 1
    rig.clock.advance(2 * CMD_NS)
    assert rig.cons == 3
    rig.run()
    assert rig.cons == 3 and rig.gerror_active() == 0


def test_cons_wraps_with_a_two_entry_queue() -> None:
    rig = Rig()
    rig.setup_cmdq(1)
    expected = [0b10, 0b11, 0b00, 0b01]  # (wrap, index) after 2, 3, 4, 5 commands
    rig.submit(SYNC, SYNC)
    rig.run()
    assert rig.cons == expected[0]
    for value in expected[1:]:
        rig.submit(SYNC)
        rig.run()
        assert rig.cons == value
    assert rig.rd(Reg.CMDQ_PROD) == 0b01


def test_cons_wraps_with_an_eight_entry_queue_and_a_full_queue_is_consumed() -> None:
    rig = Rig()
    rig.setup_cmdq(3)
    rig.submit(*[NSNH_ALL] * 6)
    rig.run()
    assert rig.cons == 6
    rig.submit(*[NSNH_ALL] * 8)  # PROD = 6 + 8 = 14 = wrap 1, index 6: queue full
    assert rig.rd(Reg.CMDQ_PROD) == 0b1110
    rig.run()
    assert rig.cons == 0b1110


def test_nothing_is_consumed_until_cmdqen_is_acknowledged() -> None:
    rig = Rig()
    rig.wr(Reg.CMDQ_BASE, CMDQ_BASE.encode(ADDR=CMDQ >> 5, LOG2SIZE=3), 8)
    rig.log2size, rig.cmdq_base = 3, CMDQ
    rig.submit(SYNC, SYNC)
    rig.run()
    assert rig.cons == 0
    rig.wr(Reg.CR0, CR0.encode(CMDQEN=1))
    rig.clock.advance(UPDATE_NS - 1)
    assert rig.cons == 0
    rig.run()
    assert rig.cons == 2


def test_disabling_cmdqen_stops_consumption_at_its_ack() -> None:
    rig = Rig()
    rig.setup_cmdq(4)
    rig.submit(*[NSNH_ALL] * 12)
    rig.clock.advance(CMD_NS)
    rig.wr(Reg.CR0, 0)
    rig.clock.advance(UPDATE_NS)
    stopped = rig.cons
    assert 1 + UPDATE_NS // CMD_NS - 1 <= stopped <= 1 + UPDATE_NS // CMD_NS  # consumed until the ACK
    rig.run()
    assert rig.cons == stopped
    rig.control(Reg.CR0, CR0.encode(CMDQEN=1))
    rig.run()
    assert rig.cons == 12


# ---- command errors -------------------------------------------------------------------------------


def test_cerror_ill_stops_on_the_bad_command_and_raises_cmdq_err() -> None:
    rig = Rig()
    rig.control(Reg.IRQ_CTRL, IRQ_CTRL.encode(GERROR_IRQEN=1))
    rig.setup_cmdq(3)
    rig.submit(NSNH_ALL, ILLEGAL, SYNC)
    rig.run()
    assert rig.cons == 1
    assert rig.err == CmdqError.ILL
    assert rig.gerror_active() == GERROR.encode(CMDQ_ERR=1)
    assert rig.irq.count("smmu0.gerror") == 1
    rig.submit(SYNC)  # a PROD write does not restart consumption while CMDQ_ERR is active
    rig.run()
    assert rig.cons == 1


def test_restart_after_replacing_the_bad_command_and_acknowledging() -> None:
    rig = Rig()
    rig.setup_cmdq(3)
    rig.submit(NSNH_ALL, ILLEGAL, NSNH_ALL, SYNC)
    rig.run()
    assert rig.cons == 1
    rig.put(1, SYNC)  # as Linux does: turn the faulting command into a CMD_SYNC
    rig.wr(Reg.GERRORN, rig.rd(Reg.GERROR))
    rig.run()  # no PROD write needed
    assert rig.cons == 4
    assert rig.gerror_active() == 0


def test_cerror_abt_for_a_queue_in_unmapped_space() -> None:
    rig = Rig()
    rig.setup_cmdq(2, base=UNMAPPED)
    rig.submit(SYNC)
    rig.run()
    assert rig.cons == 0
    assert rig.err == CmdqError.ABT
    assert rig.gerror_active() == GERROR.encode(CMDQ_ERR=1)


def test_command_fetches_are_smmu_accesses_through_the_bus() -> None:
    rig = Rig()
    seen: list[Access] = []
    rig.bus.observers.append(seen.append)
    rig.setup_cmdq(3)
    rig.submit(NSNH_ALL, NSNH_ALL)
    rig.run()
    fetches = [a for a in seen if a.initiator.purpose == "cmdq-fetch"]
    assert [a.address for a in fetches] == [CMDQ, CMDQ + 16]
    assert all(a.initiator.name == "smmu0" and a.size == 16 for a in fetches)


# ---- CMD_SYNC completion signals ------------------------------------------------------------------


def test_cmd_sync_msi_lands_in_memory_after_cons_passes_the_sync() -> None:
    rig = Rig()
    rig.setup_cmdq(3)
    cons_at_msi: list[int] = []

    def observe(access: Access) -> None:
        if access.initiator.purpose == "msi":
            cons_at_msi.append(rig.cons)

    rig.bus.observers.append(observe)
    rig.submit(NSNH_ALL, build_command(Opcode.SYNC, CS=1, MSIADDR=MSI_TARGET, MSIDATA=0xCAFE_F00D))
    rig.run()
    assert rig.bus.read(HYP_CPU, MSI_TARGET, 4) == 0xCAFE_F00D
    assert cons_at_msi == [2]  # the completion is observable only once CONS moved past the SYNC


def test_cmd_sync_msi_to_the_doorbell_raises_that_interrupt() -> None:
    rig = Rig()
    rig.setup_cmdq(3)
    rig.submit(build_command(Opcode.SYNC, CS=1, MSIADDR=DOORBELL + MsiDoorbell.TRANSLATER, MSIDATA=77))
    rig.run()
    assert rig.irq.count(msi_line(77)) == 1


def test_cmd_sync_msi_abort_sets_msi_cmdq_abt_err_and_still_completes() -> None:
    rig = Rig()
    rig.setup_cmdq(3)
    rig.submit(build_command(Opcode.SYNC, CS=1, MSIADDR=UNMAPPED, MSIDATA=1), SYNC)
    rig.run()
    assert rig.cons == 2
    assert rig.gerror_active() == GERROR.encode(MSI_CMDQ_ABT_ERR=1)


def test_cmd_sync_irq_pulses_the_wired_line_and_sev_counts() -> None:
    rig = Rig()
    rig.setup_cmdq(3)
    rig.submit(build_command(Opcode.SYNC, CS=1), build_command(Opcode.SYNC, CS=2), SYNC)
    rig.run()
    assert rig.irq.count("smmu0.cmd-sync") == 1
    assert rig.smmu.sev_count == 1
    assert rig.bus.read(HYP_CPU, 0, 4) is not None  # no MSI was attempted at address 0
    assert rig.gerror_active() == 0


def test_cmd_sync_sev_without_idr0_sev_is_sig_none() -> None:
    rig = Rig(SmmuFeatures(sev=False))
    rig.setup_cmdq(3)
    rig.submit(build_command(Opcode.SYNC, CS=2))
    rig.run()
    assert rig.cons == 1 and rig.smmu.sev_count == 0


# ---- event queue ----------------------------------------------------------------------------------


def test_events_land_at_consecutive_slots() -> None:
    rig = Rig()
    rig.setup_evtq(2)
    for sid in range(3):
        assert rig.smmu.record_event(event(sid))
    assert [rig.event_at(slot) for slot in range(3)] == [event(0), event(1), event(2)]
    assert EVENTQ_PROD.WR.get(rig.rd(Reg.EVENTQ_PROD)) == 3


def test_event_queue_wraps_its_prod_index() -> None:
    rig = Rig()
    rig.setup_evtq(1)
    assert rig.smmu.record_event(event(1)) and rig.smmu.record_event(event(2))
    rig.wr(Reg.EVENTQ_CONS, 0b10)  # software consumed both
    assert rig.smmu.record_event(event(3))
    assert rig.rd(Reg.EVENTQ_PROD) == 0b11
    assert rig.event_at(0) == event(3)


def test_full_queue_discards_and_toggles_ovflg_once_until_acknowledged() -> None:
    rig = Rig()
    rig.setup_evtq(1)
    assert rig.smmu.record_event(event(1)) and rig.smmu.record_event(event(2))
    assert not rig.smmu.record_event(event(3))
    prod = rig.rd(Reg.EVENTQ_PROD)
    assert EVENTQ_PROD.OVFLG.get(prod) == 1 and EVENTQ_PROD.WR.get(prod) == 0b10
    assert not rig.smmu.record_event(event(4))
    assert EVENTQ_PROD.OVFLG.get(rig.rd(Reg.EVENTQ_PROD)) == 1  # overflow still pending: no toggle
    assert rig.event_at(0) == event(1) and rig.event_at(1) == event(2)
    # software consumes one record and acknowledges the overflow with its CONS update
    rig.wr(Reg.EVENTQ_CONS, EVENTQ_CONS.encode(RD=1, OVACKFLG=1))
    assert rig.smmu.record_event(event(5))
    assert not rig.smmu.record_event(event(6))
    assert EVENTQ_PROD.OVFLG.get(rig.rd(Reg.EVENTQ_PROD)) == 0  # a new overflow toggles again


def test_disabled_event_queue_discards_without_overflow() -> None:
    rig = Rig()
    rig.wr(Reg.EVENTQ_BASE, EVENTQ_BASE.encode(ADDR=EVTQ >> 5, LOG2SIZE=0), 8)
    for sid in range(3):
        assert not rig.smmu.record_event(event(sid))
    assert rig.rd(Reg.EVENTQ_PROD) == 0
    assert rig.event_at(0) == 0


def test_event_write_abort_sets_eventq_abt_err_and_makes_the_queue_unwritable() -> None:
    rig = Rig()
    rig.control(Reg.IRQ_CTRL, IRQ_CTRL.encode(GERROR_IRQEN=1))
    rig.setup_evtq(2, base=UNMAPPED)
    seen: list[Access] = []
    rig.bus.observers.append(seen.append)
    assert not rig.smmu.record_event(event(1))
    assert rig.gerror_active() == GERROR.encode(EVENTQ_ABT_ERR=1)
    assert rig.rd(Reg.EVENTQ_PROD) == 0
    assert rig.irq.count("smmu0.gerror") == 1
    assert not rig.smmu.record_event(event(2))
    assert len([a for a in seen if a.initiator.purpose == "evtq-write"]) == 1  # not attempted again


def test_eventq_interrupt_only_on_empty_to_non_empty() -> None:
    rig = Rig()
    rig.wr(Reg.EVENTQ_IRQ_CFG0, MSI_TARGET, 8)
    rig.wr(Reg.EVENTQ_IRQ_CFG1, 0x55)
    rig.control(Reg.IRQ_CTRL, IRQ_CTRL.encode(EVENTQ_IRQEN=1))
    rig.setup_evtq(3)
    rig.smmu.record_event(event(1))
    rig.smmu.record_event(event(2))
    assert rig.irq.count("smmu0.eventq") == 1
    assert rig.bus.read(HYP_CPU, MSI_TARGET, 4) == 0x55
    rig.bus.write(HYP_CPU, MSI_TARGET, 4, 0)
    rig.wr(Reg.EVENTQ_CONS, 2)  # drained
    rig.smmu.record_event(event(3))
    assert rig.irq.count("smmu0.eventq") == 2
    assert rig.bus.read(HYP_CPU, MSI_TARGET, 4) == 0x55


def test_eventq_interrupt_needs_its_enable_acknowledged() -> None:
    rig = Rig()
    rig.setup_evtq(3)
    rig.wr(Reg.IRQ_CTRL, IRQ_CTRL.encode(EVENTQ_IRQEN=1))  # not yet acknowledged
    rig.smmu.record_event(event(1))
    assert rig.irq.count("smmu0.eventq") == 0


def test_gerror_msi_abort_sets_msi_gerror_abt_err_without_another_interrupt() -> None:
    rig = Rig()
    rig.wr(Reg.GERROR_IRQ_CFG0, UNMAPPED, 8)
    rig.control(Reg.IRQ_CTRL, IRQ_CTRL.encode(GERROR_IRQEN=1))
    rig.setup_cmdq(3)
    rig.submit(ILLEGAL)
    rig.run()
    assert rig.gerror_active() == GERROR.encode(CMDQ_ERR=1, MSI_GERROR_ABT_ERR=1)
    assert rig.irq.count("smmu0.gerror") == 1


def test_wired_lines_can_be_absent() -> None:
    rig = Rig(wired_irqs=False)
    rig.control(Reg.IRQ_CTRL, IRQ_CTRL.encode(GERROR_IRQEN=1))
    rig.setup_cmdq(3)
    rig.submit(ILLEGAL)
    rig.run()
    assert rig.irq.counts == {}
