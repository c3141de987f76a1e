"""MMIO emulation (v4 patches 19, 20, 22, 23, 25): every register class as the host sees it through
its stage-2, and what reaches the real SMMU."""

from __future__ import annotations

import os
import sys

import pytest

from pkvm_smmu.arch.registers import CR1, GBPA, IDR0, QueueCacheability, Reg, Shareability, StrtabFmt
from pkvm_smmu.hyp.smmuv3.policy import HIDDEN_IDR0, LINUX_CR1

sys.path.insert(0, os.path.dirname(__file__))
from hyp_smmu_rig import PkvmRig, make_rig


@pytest.fixture
def r() -> PkvmRig:
    return make_rig()


def last_trap(r: PkvmRig) -> dict[str, object]:
    return dict(r.events("hyp.smmuv3", "trap")[-1].fields)


def test_idr0_hides_s2p_vmid16_msi_hyp(r: PkvmRig) -> None:
    real = r.hw_reg(Reg.IDR0)
    assert real & HIDDEN_IDR0 == HIDDEN_IDR0  # the hardware has them all
    seen = r.host_read(Reg.IDR0)
    assert seen == real & ~HIDDEN_IDR0
    for name in ("S2P", "VMID16", "MSI", "HYP"):
        assert not IDR0.field(name).get(seen)
    assert IDR0.S1P.get(seen) and IDR0.ST_LEVEL.get(seen) == 1 and IDR0.SEV.get(seen)
    assert last_trap(r)["access"] == "read-only"


@pytest.mark.parametrize("reg", [Reg.IDR0, Reg.IDR1, Reg.IDR3, Reg.IDR5, Reg.IIDR, Reg.GERROR])
def test_read_only_registers_drop_writes(r: PkvmRig, reg: Reg) -> None:
    before = r.hw_reg(reg)
    r.sink.clear()
    assert r.host_write(reg, 0xFFFF_FFFF) is None  # the host instruction completes
    assert r.hw_reg(reg) == before
    assert r.warnings() == ["write to a read-only register dropped"]
    assert not r.events(r.smmu.name, "reg.write")  # nothing reached the SMMU


@pytest.mark.parametrize("reg", [Reg.IDR2, Reg.IDR4, Reg.AIDR, Reg.STATUSR, Reg.GATOS_CTRL, 0x0A8])
def test_other_registers_are_dropped(r: PkvmRig, reg: int) -> None:
    r.sink.clear()
    assert r.host_read(reg) == 0
    assert r.host_write(reg, 1) is None
    assert r.warnings() == ["register access dropped"] * 2
    assert not r.events(r.smmu.name, "reg.write")


def test_32bit_passthrough_reaches_the_smmu(r: PkvmRig) -> None:
    r.host_write(Reg.CR2, 0x3)
    assert r.hw_reg(Reg.CR2) == 0x3 and r.host_read(Reg.CR2) == 0x3
    r.host_write(Reg.IRQ_CTRL, 0x5)
    r.clock.advance(1000)
    assert r.host_read(Reg.IRQ_CTRLACK) == 0x5
    r.host_write(Reg.EVENTQ_CONS, 0x3)  # page 1
    assert r.hw_reg(Reg.EVENTQ_CONS) == r.host_read(Reg.EVENTQ_CONS)
    assert last_trap(r)["reg"] == "EVENTQ_CONS" and last_trap(r)["access"] == "pass"


@pytest.mark.parametrize("reg", [Reg.CR2, Reg.IRQ_CTRL, Reg.GERRORN, Reg.IDR1, Reg.CR0, Reg.GBPA])
def test_32bit_registers_enforce_their_size(r: PkvmRig, reg: Reg) -> None:
    before = r.hw_reg(reg)
    r.sink.clear()
    aligned = int(reg) & ~7
    assert r.host_cpu.write(0x0900_0000 + aligned, 8, 0xFFFF_FFFF_FFFF_FFFF) is None
    if aligned == reg:
        assert r.warnings() == ["register access of the wrong size dropped"]
        assert r.host_read(reg, 2) == 0  # a 16-bit read is dropped too
    assert r.hw_reg(reg) == before


def test_64bit_passthrough_takes_any_size(r: PkvmRig) -> None:
    r.host_write(Reg.EVENTQ_BASE, 0x8800_0000 | 7, 8)
    assert r.hw_reg(Reg.EVENTQ_BASE, 8) == 0x8800_0007
    r.host_write(Reg.GERROR_IRQ_CFG0, 0x1234_5670, 4)  # low half only
    assert r.hw_reg(Reg.GERROR_IRQ_CFG0, 8) == 0x1234_5670
    assert r.host_read(Reg.EVENTQ_BASE, 8) == 0x8800_0007
    assert not r.warnings()


def test_upper_half_of_a_64bit_register_is_dropped(r: PkvmRig) -> None:
    r.host_write(Reg.EVENTQ_BASE + 4, 0x1)
    assert r.hw_reg(Reg.EVENTQ_BASE, 8) == 0
    assert r.warnings() == ["register access dropped"]


def test_gbpa_is_recorded_and_the_smmu_stays_abort(r: PkvmRig) -> None:
    assert r.host_read(Reg.GBPA) == 0
    r.sink.clear()
    r.host_write(Reg.GBPA, GBPA.UPDATE.in_place_mask | GBPA.encode(SHCFG=1))  # bypass
    assert r.host_read(Reg.GBPA) == GBPA.encode(SHCFG=1)  # recorded without UPDATE: "done" at once
    r.clock.advance(10_000)
    assert r.hw_reg(Reg.GBPA) == GBPA.ABORT.in_place_mask
    assert not r.events(r.smmu.name, "reg.write")


def test_cr1_passes_through_and_warns_unless_linux_value(r: PkvmRig) -> None:
    r.host_write(Reg.CR0, 0)  # as the host driver does first: CR1's queue fields are guarded by CMDQEN
    r.clock.advance(1000)
    r.host_write(Reg.CR1, LINUX_CR1)
    assert r.hw_reg(Reg.CR1) == LINUX_CR1 and not r.warnings()
    other = CR1.encode(QUEUE_IC=QueueCacheability.NC, TABLE_SH=Shareability.OSH)
    r.host_write(Reg.CR1, other)
    assert r.hw_reg(Reg.CR1) == other  # v4 writes it anyway
    assert r.warnings() == ["CR1 is not Linux's value"]


def test_cr0_is_tracked_and_written(r: PkvmRig) -> None:
    r.host_write(Reg.CR0, 0)
    assert r.hyp.cr0 == 0
    r.clock.advance(1000)
    assert r.hw_reg(Reg.CR0ACK) == 0 and r.host_read(Reg.CR0ACK) == 0
    r.host_write(Reg.CMDQ_BASE, 0x8300_0000 | 4, 8)
    r.host_write(Reg.CR0, CR0_CMDQEN)
    assert r.hyp.cmdq_enabled and r.hw_reg(Reg.CR0) == CR0_CMDQEN


CR0_CMDQEN = 1 << 3


def test_queue_and_table_registers_are_recorded_not_written(r: PkvmRig) -> None:
    hw_cmdq, hw_strtab, hw_cfg = (
        r.hw_reg(Reg.CMDQ_BASE, 8),
        r.hw_reg(Reg.STRTAB_BASE, 8),
        r.hw_reg(Reg.STRTAB_BASE_CFG),
    )
    r.host_write(Reg.CMDQ_BASE, 0x8300_0000 | 8, 8)
    r.host_write(Reg.STRTAB_BASE, 0x8400_0000, 8)
    r.host_write(Reg.STRTAB_BASE_CFG, StrtabFmt.TWO_LEVEL << 16 | 8 << 6 | 16)
    r.host_write(Reg.CMDQ_PROD, 0)
    r.host_write(Reg.CMDQ_CONS, 0)
    assert r.host_read(Reg.CMDQ_BASE, 8) == 0x8300_0008
    assert r.host_read(Reg.STRTAB_BASE, 8) == 0x8400_0000
    assert r.host_read(Reg.STRTAB_BASE_CFG) == StrtabFmt.TWO_LEVEL << 16 | 8 << 6 | 16
    assert (r.hw_reg(Reg.CMDQ_BASE, 8), r.hw_reg(Reg.STRTAB_BASE, 8), r.hw_reg(Reg.STRTAB_BASE_CFG)) == (
        hw_cmdq,
        hw_strtab,
        hw_cfg,
    )


def test_base_writes_while_enabled_warn(r: PkvmRig) -> None:
    r.host_write(Reg.CMDQ_BASE, 0x8300_0000 | 4, 8)
    r.host_write(Reg.CR0, CR0_CMDQEN)
    r.host_write(Reg.CMDQ_BASE, 0x8310_0000 | 4, 8)
    assert "CMDQ_BASE written while the command queue is enabled" in r.warnings()
    assert r.host_read(Reg.CMDQ_BASE, 8) == 0x8310_0004  # recorded anyway, as posted


def test_traps_are_counted_by_register(r: PkvmRig) -> None:
    r.counters.clear()
    for _ in range(3):
        r.host_read(Reg.IDR0)
    r.host_write(Reg.GBPA, 1 << 31)
    assert r.counters.by_field("hyp.smmuv3", "trap", "reg") == {"IDR0": 3, "GBPA": 1}
    assert r.counters.by_field("hyp.smmuv3", "trap", "access") == {"read-only": 3, "emulate": 1}
