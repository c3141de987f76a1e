"""The SMMU register file: ACK/Update latency, GBPA protocol, guarded fields, GERROR/GERRORN,
64-bit halves, Page 1, index masking and accesses that are RAZ/WI (IHI 0070 §6)."""

from __future__ import annotations

import pytest

from pkvm_smmu.arch.registers import (
    CMDQ_BASE,
    CR0,
    CR1,
    CR2,
    EVENTQ_BASE,
    GBPA,
    GERROR,
    IRQ_CTRL,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    Reg,
)
from pkvm_smmu.machine.bus import HYP_CPU, ExternalAbort, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.smmu import GBPA_RESET_ABORT, SmmuFeatures, SmmuOptions, SmmuV3

BASE = 0x1000_0000
LATENCY = 100


def make(features: SmmuFeatures | None = None, **options: object) -> SmmuV3:
    bus = SystemBus()
    bus.add_ram(0x8000_0000, 1 << 24)
    opts = SmmuOptions(register_update_ns=LATENCY, **options)  # type: ignore[arg-type]
    return SmmuV3("smmu0", bus, Clock(), features or SmmuFeatures(), BASE, options=opts)


def rd(smmu: SmmuV3, offset: int, size: int = 4) -> int:
    value = smmu.bus.read(HYP_CPU, BASE + offset, size)
    assert not isinstance(value, ExternalAbort)
    return value


def wr(smmu: SmmuV3, offset: int, value: int, size: int = 4) -> None:
    assert smmu.bus.write(HYP_CPU, BASE + offset, size, value) is None


def settle(smmu: SmmuV3) -> None:
    smmu.clock.advance(LATENCY)


# ---- ID registers ---------------------------------------------------------------------------------


def test_id_registers_come_from_features_and_ignore_writes() -> None:
    features = SmmuFeatures(stage1=False, ats=False, sid_bits=8)
    smmu = make(features)
    expected = {
        Reg.IDR0: features.idr0(),
        Reg.IDR1: features.idr1(),
        Reg.IDR3: features.idr3(),
        Reg.IDR5: features.idr5(),
        Reg.IIDR: features.iidr(),
        Reg.AIDR: features.aidr(),
    }
    for reg, value in expected.items():
        assert rd(smmu, reg) == value
        wr(smmu, reg, ~value & 0xFFFF_FFFF)
        assert rd(smmu, reg) == value
    assert [rd(smmu, r) for r in (Reg.CIDR0, Reg.CIDR1, Reg.CIDR2, Reg.CIDR3)] == [0x0D, 0xF0, 0x05, 0xB1]


# ---- CR0 / IRQ_CTRL Update and ACK ----------------------------------------------------------------


def test_cr0_ack_follows_after_the_update_latency() -> None:
    smmu = make()
    wr(smmu, Reg.CR0, CR0.encode(SMMUEN=1, EVENTQEN=1))
    assert rd(smmu, Reg.CR0) == CR0.encode(SMMUEN=1, EVENTQEN=1)  # readable at once
    assert rd(smmu, Reg.CR0ACK) == 0
    assert not smmu.smmu_enabled  # the effective state is the ACK
    smmu.clock.advance(LATENCY - 1)
    assert rd(smmu, Reg.CR0ACK) == 0
    smmu.clock.advance(1)
    assert rd(smmu, Reg.CR0ACK) == CR0.encode(SMMUEN=1, EVENTQEN=1)
    assert smmu.smmu_enabled and smmu.eventq_enabled


def test_cr0_rewrite_before_ack_newest_value_wins() -> None:
    smmu = make()
    wr(smmu, Reg.CR0, CR0.encode(EVENTQEN=1))
    smmu.clock.advance(LATENCY // 2)
    wr(smmu, Reg.CR0, CR0.encode(SMMUEN=1))
    smmu.clock.advance(LATENCY // 2)
    assert rd(smmu, Reg.CR0ACK) == 0  # the Update restarted with the newest write
    smmu.clock.advance(LATENCY // 2)
    assert rd(smmu, Reg.CR0ACK) == CR0.encode(SMMUEN=1)


def test_cr0_res0_and_unimplemented_fields_are_not_stored() -> None:
    smmu = make(SmmuFeatures(ats=False))
    wr(smmu, Reg.CR0, 0xFFFF_FFFF)
    assert rd(smmu, Reg.CR0) == CR0.encode(SMMUEN=1, EVENTQEN=1, CMDQEN=1)  # no PRI, ATS, VMW, DPT


def test_irq_ctrl_ack_latency() -> None:
    smmu = make()
    value = IRQ_CTRL.encode(GERROR_IRQEN=1, EVENTQ_IRQEN=1)
    wr(smmu, Reg.IRQ_CTRL, value)
    assert rd(smmu, Reg.IRQ_CTRL) == value
    assert rd(smmu, Reg.IRQ_CTRLACK) == 0
    settle(smmu)
    assert rd(smmu, Reg.IRQ_CTRLACK) == value


# ---- GBPA -----------------------------------------------------------------------------------------


def test_gbpa_resets_to_bypass_with_incoming_shareability() -> None:
    smmu = make()
    assert rd(smmu, Reg.GBPA) == 0x1000
    assert smmu.gbpa == 0x1000
    assert make(gbpa_reset=GBPA_RESET_ABORT).gbpa == GBPA.encode(ABORT=1, SHCFG=1)


def test_gbpa_write_without_update_is_ignored() -> None:
    smmu = make()
    wr(smmu, Reg.GBPA, GBPA.encode(ABORT=1))
    settle(smmu)
    assert rd(smmu, Reg.GBPA) == 0x1000
    assert not GBPA.ABORT.get(smmu.gbpa)


def test_gbpa_update_applies_after_latency_and_clears_update() -> None:
    smmu = make()
    wr(smmu, Reg.GBPA, GBPA.encode(UPDATE=1, ABORT=1))
    assert GBPA.UPDATE.get(rd(smmu, Reg.GBPA)) == 1
    assert not GBPA.ABORT.get(smmu.gbpa)  # not yet in effect
    smmu.clock.advance(LATENCY - 1)
    assert GBPA.UPDATE.get(rd(smmu, Reg.GBPA)) == 1
    smmu.clock.advance(1)
    assert rd(smmu, Reg.GBPA) == GBPA.encode(ABORT=1)
    assert smmu.gbpa == GBPA.encode(ABORT=1)


def test_gbpa_write_while_update_pending_is_ignored() -> None:
    smmu = make()
    wr(smmu, Reg.GBPA, GBPA.encode(UPDATE=1, ABORT=1))
    wr(smmu, Reg.GBPA, GBPA.encode(UPDATE=1, SHCFG=2))
    settle(smmu)
    assert smmu.gbpa == GBPA.encode(ABORT=1)
    assert rd(smmu, Reg.GBPA) == GBPA.encode(ABORT=1)


# ---- guarded fields -------------------------------------------------------------------------------

ENABLE_CR0 = "cr0"
ENABLE_IRQ = "irq"

GUARDED = [
    # (register, size, value, enable register, enable bits)
    (Reg.CMDQ_BASE, 8, CMDQ_BASE.encode(ADDR=0x8000_0000 >> 5, LOG2SIZE=3), ENABLE_CR0, CR0.encode(CMDQEN=1)),
    (Reg.CMDQ_CONS, 4, 0x5, ENABLE_CR0, CR0.encode(CMDQEN=1)),
    (
        Reg.EVENTQ_BASE,
        8,
        EVENTQ_BASE.encode(ADDR=0x8001_0000 >> 5, LOG2SIZE=3),
        ENABLE_CR0,
        CR0.encode(EVENTQEN=1),
    ),
    (Reg.EVENTQ_PROD, 4, 0x5, ENABLE_CR0, CR0.encode(EVENTQEN=1)),
    (Reg.STRTAB_BASE, 8, STRTAB_BASE.encode(ADDR=0x8002_0000 >> 6), ENABLE_CR0, CR0.encode(SMMUEN=1)),
    (
        Reg.STRTAB_BASE_CFG,
        4,
        STRTAB_BASE_CFG.encode(LOG2SIZE=8, FMT=1, SPLIT=6),
        ENABLE_CR0,
        CR0.encode(SMMUEN=1),
    ),
    (Reg.CR2, 4, CR2.encode(RECINVSID=1, E2H=1), ENABLE_CR0, CR0.encode(SMMUEN=1)),
    (Reg.GERROR_IRQ_CFG0, 8, 0x8003_0000, ENABLE_IRQ, IRQ_CTRL.encode(GERROR_IRQEN=1)),
    (Reg.GERROR_IRQ_CFG1, 4, 0x1234, ENABLE_IRQ, IRQ_CTRL.encode(GERROR_IRQEN=1)),
    (Reg.GERROR_IRQ_CFG2, 4, 0x13, ENABLE_IRQ, IRQ_CTRL.encode(GERROR_IRQEN=1)),
    (Reg.EVENTQ_IRQ_CFG0, 8, 0x8003_0040, ENABLE_IRQ, IRQ_CTRL.encode(EVENTQ_IRQEN=1)),
    (Reg.EVENTQ_IRQ_CFG1, 4, 0x4321, ENABLE_IRQ, IRQ_CTRL.encode(EVENTQ_IRQEN=1)),
    (Reg.EVENTQ_IRQ_CFG2, 4, 0x21, ENABLE_IRQ, IRQ_CTRL.encode(EVENTQ_IRQEN=1)),
]


def _queues_sized(smmu: SmmuV3) -> None:
    # index registers keep LOG2SIZE+1 bits; give both queues 8 entries first
    wr(smmu, Reg.CMDQ_BASE, CMDQ_BASE.encode(LOG2SIZE=3), 8)
    wr(smmu, Reg.EVENTQ_BASE, EVENTQ_BASE.encode(LOG2SIZE=3), 8)


@pytest.mark.parametrize(("reg", "size", "value", "enable_reg", "enable"), GUARDED, ids=lambda v: str(v))
def test_guarded_register_ignores_writes_while_enabled(
    reg: Reg, size: int, value: int, enable_reg: str, enable: int
) -> None:
    smmu = make()
    _queues_sized(smmu)
    before = rd(smmu, reg, size)
    control = Reg.CR0 if enable_reg == ENABLE_CR0 else Reg.IRQ_CTRL
    wr(smmu, control, enable)
    wr(smmu, reg, value, size)  # enable written, ACK still 0: already guarded
    assert rd(smmu, reg, size) == before
    settle(smmu)
    wr(smmu, reg, value, size)
    assert rd(smmu, reg, size) == before
    wr(smmu, reg, value & 0xFFFF_FFFF, 4)  # a half write is guarded too
    assert rd(smmu, reg, size) == before
    wr(smmu, control, 0)
    wr(smmu, reg, value, size)  # enable cleared but its ACK still 1: still guarded
    assert rd(smmu, reg, size) == before
    settle(smmu)
    wr(smmu, reg, value, size)
    assert rd(smmu, reg, size) == value


@pytest.mark.parametrize(("reg", "size", "value", "enable_reg", "enable"), GUARDED, ids=lambda v: str(v))
def test_guarded_register_accepts_writes_while_disabled(
    reg: Reg, size: int, value: int, enable_reg: str, enable: int
) -> None:
    smmu = make()
    _queues_sized(smmu)
    wr(smmu, reg, value, size)
    assert rd(smmu, reg, size) == value


def test_cmdq_prod_and_eventq_cons_are_not_guarded() -> None:
    smmu = make()
    _queues_sized(smmu)
    wr(smmu, Reg.CR0, CR0.encode(CMDQEN=1, EVENTQEN=1))
    settle(smmu)
    wr(smmu, Reg.EVENTQ_CONS, 0)
    wr(smmu, Reg.EVENTQ_CONS, 0x8000_0000)
    assert rd(smmu, Reg.EVENTQ_CONS) == 0x8000_0000
    wr(smmu, Reg.CMDQ_PROD, 0)
    assert rd(smmu, Reg.CMDQ_PROD) == 0


def test_cr1_queue_fields_guarded_by_queue_enables_table_fields_by_smmuen() -> None:
    smmu = make()
    queue = CR1.encode(QUEUE_IC=1, QUEUE_OC=1, QUEUE_SH=3)
    table = CR1.encode(TABLE_IC=1, TABLE_OC=1, TABLE_SH=3)
    wr(smmu, Reg.CR0, CR0.encode(CMDQEN=1))
    settle(smmu)
    wr(smmu, Reg.CR1, queue | table)
    assert rd(smmu, Reg.CR1) == table
    wr(smmu, Reg.CR0, CR0.encode(SMMUEN=1))
    settle(smmu)
    wr(smmu, Reg.CR1, queue)
    assert rd(smmu, Reg.CR1) == queue | table  # TABLE_* kept, QUEUE_* written


# ---- GERROR / GERRORN -----------------------------------------------------------------------------

CMDQ_ERR = GERROR.encode(CMDQ_ERR=1)
EVENTQ_ABT_ERR = GERROR.encode(EVENTQ_ABT_ERR=1)


def test_gerror_is_read_only() -> None:
    smmu = make()
    wr(smmu, Reg.GERROR, 0xFFFF_FFFF)
    assert rd(smmu, Reg.GERROR) == 0


def test_gerror_toggle_protocol() -> None:
    smmu = make()
    smmu.interrupts.raise_gerror(CMDQ_ERR)
    assert rd(smmu, Reg.GERROR) == CMDQ_ERR
    assert rd(smmu, Reg.GERRORN) == 0
    smmu.interrupts.raise_gerror(CMDQ_ERR)  # further occurrences while active are not logged
    assert rd(smmu, Reg.GERROR) == CMDQ_ERR
    wr(smmu, Reg.GERRORN, rd(smmu, Reg.GERROR))  # acknowledge
    assert not smmu.regs.gerror_active(CMDQ_ERR)
    smmu.interrupts.raise_gerror(CMDQ_ERR)  # a new occurrence toggles the bit back to 0
    assert rd(smmu, Reg.GERROR) == 0
    assert rd(smmu, Reg.GERRORN) == CMDQ_ERR
    assert smmu.regs.gerror_active(CMDQ_ERR)
    wr(smmu, Reg.GERRORN, 0)
    assert not smmu.regs.gerror_active(CMDQ_ERR)


def test_gerrorn_toggle_of_an_inactive_error_is_ignored() -> None:
    smmu = make()
    wr(smmu, Reg.GERRORN, EVENTQ_ABT_ERR)
    assert rd(smmu, Reg.GERRORN) == 0
    assert smmu.regs.gerror_active_bits == 0


def test_gerrorn_acknowledges_only_the_toggled_errors() -> None:
    smmu = make()
    smmu.interrupts.raise_gerror(CMDQ_ERR | EVENTQ_ABT_ERR)
    wr(smmu, Reg.GERRORN, CMDQ_ERR)
    assert smmu.regs.gerror_active_bits == EVENTQ_ABT_ERR


# ---- access sizes, halves, undefined offsets ------------------------------------------------------


def test_64bit_register_whole_and_half_accesses() -> None:
    smmu = make()
    value = STRTAB_BASE.encode(RA=1, ADDR=0x1234_5678_9 >> 2)
    wr(smmu, Reg.STRTAB_BASE, value, 8)
    assert rd(smmu, Reg.STRTAB_BASE, 8) == value
    assert rd(smmu, Reg.STRTAB_BASE) == value & 0xFFFF_FFFF
    assert rd(smmu, Reg.STRTAB_BASE + 4) == value >> 32
    wr(smmu, Reg.CMDQ_BASE, 0x8000_0003)
    wr(smmu, Reg.CMDQ_BASE + 4, 0x4000_0012)
    assert rd(smmu, Reg.CMDQ_BASE, 8) == 0x4000_0012_8000_0003
    wr(smmu, Reg.CMDQ_BASE + 4, 0)  # the low half is untouched
    assert rd(smmu, Reg.CMDQ_BASE, 8) == 0x8000_0003


def test_queue_base_address_bits_above_oas_are_not_stored() -> None:
    smmu = make(SmmuFeatures(oas_bits=40))
    wr(smmu, Reg.EVENTQ_BASE, (1 << 45) | 0x8000_0000 | 3, 8)
    assert rd(smmu, Reg.EVENTQ_BASE, 8) == 0x8000_0003


@pytest.mark.parametrize("size", [1, 2])
def test_narrow_accesses_are_raz_wi(size: int) -> None:
    smmu = make()
    wr(smmu, Reg.CR0, 0x1, size)
    settle(smmu)
    assert rd(smmu, Reg.CR0) == 0
    assert rd(smmu, Reg.IDR0, size) == 0


def test_64bit_access_to_32bit_registers_is_raz_wi() -> None:
    smmu = make()
    wr(smmu, Reg.CR0, CR0.encode(SMMUEN=1), 8)  # CR0 + CR0ACK pair
    settle(smmu)
    assert rd(smmu, Reg.CR0) == 0
    assert rd(smmu, Reg.IDR0, 8) == 0
    # the bus aborts a misaligned access itself; the device reads it as zero
    assert smmu.mmio_read(Reg.STRTAB_BASE + 4, 8, HYP_CPU) == 0


def test_unaligned_and_odd_accesses_never_raise() -> None:
    smmu = make()
    for offset in (-8, 0x21, 0x22, 0x1FFFF, 0x20000, 1 << 40):
        for size in (0, 1, 2, 3, 4, 8, 16):
            assert smmu.mmio_read(offset, size, HYP_CPU) == 0
            assert smmu.mmio_write(offset, size, -1, HYP_CPU) is None
    assert rd(smmu, Reg.CR0) == 0


@pytest.mark.parametrize(
    "offset", [0x034, 0x0A8, 0x0AC, 0x0C8, 0x1FC, 0xE00, 0x4000, 0x8020, 0x10020, 0x1FFFC]
)
def test_undefined_offsets_are_raz_wi(offset: int) -> None:
    smmu = make()
    wr(smmu, offset, 0xFFFF_FFFF)
    assert rd(smmu, offset) == 0


def test_page1_registers_and_optional_alias() -> None:
    smmu = make()
    _queues_sized(smmu)
    wr(smmu, Reg.EVENTQ_CONS, 0x8000_0003)
    assert rd(smmu, Reg.EVENTQ_CONS) == 0x8000_0003
    assert rd(smmu, 0x0AC) == 0  # the Page 0 alias is not implemented by default

    aliased = make(page1_alias_page0=True)
    _queues_sized(aliased)
    wr(aliased, 0x0AC, 0x8000_0002)
    assert rd(aliased, Reg.EVENTQ_CONS) == 0x8000_0002
    assert rd(aliased, 0x10000 + Reg.IDR0) == aliased.features.idr0()


def test_queue_index_bits_above_log2size_are_res0() -> None:
    smmu = make()
    wr(smmu, Reg.CMDQ_BASE, CMDQ_BASE.encode(LOG2SIZE=2), 8)
    wr(smmu, Reg.CMDQ_PROD, 0xFFFF_FFFF)
    assert rd(smmu, Reg.CMDQ_PROD) == 0x7  # WR[2:0]: index bits [1:0] and the wrap bit
    wr(smmu, Reg.CMDQ_CONS, 0xFFFF_FFFF)
    assert rd(smmu, Reg.CMDQ_CONS) == 0x7F00_0007  # RD plus ERR
    wr(smmu, Reg.EVENTQ_BASE, EVENTQ_BASE.encode(LOG2SIZE=0), 8)
    wr(smmu, Reg.EVENTQ_CONS, 0xFFFF_FFFF)
    assert rd(smmu, Reg.EVENTQ_CONS) == 0x8000_0001  # a one-entry queue: only the wrap bit
    wr(smmu, Reg.EVENTQ_PROD, 0xFFFF_FFFF)
    assert rd(smmu, Reg.EVENTQ_PROD) == 0x8000_0001


def test_queue_log2size_is_capped_at_idr1_but_reads_back_as_written() -> None:
    smmu = make(SmmuFeatures(cmdq_log2_max=4))
    wr(smmu, Reg.CMDQ_BASE, CMDQ_BASE.encode(LOG2SIZE=10), 8)
    assert CMDQ_BASE.LOG2SIZE.get(rd(smmu, Reg.CMDQ_BASE)) == 10
    wr(smmu, Reg.CMDQ_PROD, 0xFFFFF)
    assert rd(smmu, Reg.CMDQ_PROD) == 0x1F


def test_absent_features_make_their_registers_raz_wi() -> None:
    smmu = make(SmmuFeatures(msi=False))
    wr(smmu, Reg.GERROR_IRQ_CFG1, 0x55)
    assert rd(smmu, Reg.GERROR_IRQ_CFG1) == 0
    wr(smmu, Reg.PRIQ_BASE, 0x8000_0003, 8)  # no PRI queue
    assert rd(smmu, Reg.PRIQ_BASE, 8) == 0
    wr(smmu, Reg.IRQ_CTRL, 0x7)
    assert rd(smmu, Reg.IRQ_CTRL) == IRQ_CTRL.encode(GERROR_IRQEN=1, EVENTQ_IRQEN=1)
