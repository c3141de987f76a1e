"""Register offsets and field positions against hand-built values (IHI 0070 §6.2, §6.3)."""

from __future__ import annotations

import pytest

from pkvm_smmu.arch.registers import (
    CMDQ_BASE,
    CMDQ_CONS,
    CR0,
    CR1,
    EVENTQ_PROD,
    GBPA,
    GERROR,
    IDR0,
    IDR1,
    IDR5,
    IRQ_CFG0,
    IRQ_CFG2,
    OAS_BITS,
    PAGE1_OFFSET,
    REG_SIZE,
    REGISTER_LAYOUTS,
    SMMU_MMIO_SIZE,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    CmdqError,
    QueueCacheability,
    Reg,
    Shareability,
    Shcfg,
    StallModel,
    StrtabFmt,
    TtEndian,
    Ttf,
    oas_encoding,
)


def test_page0_and_page1_offsets() -> None:
    assert (Reg.IDR0, Reg.IDR5, Reg.CR0, Reg.CR0ACK, Reg.CR2) == (0x0, 0x14, 0x20, 0x24, 0x2C)
    assert (Reg.GBPA, Reg.IRQ_CTRL, Reg.GERROR, Reg.GERRORN) == (0x44, 0x50, 0x60, 0x64)
    assert (Reg.STRTAB_BASE, Reg.STRTAB_BASE_CFG) == (0x80, 0x88)
    assert (Reg.CMDQ_BASE, Reg.CMDQ_PROD, Reg.CMDQ_CONS) == (0x90, 0x98, 0x9C)
    assert (Reg.EVENTQ_BASE, Reg.EVENTQ_IRQ_CFG0, Reg.PRIQ_BASE, Reg.PRIQ_IRQ_CFG2) == (
        0xA0,
        0xB0,
        0xC0,
        0xDC,
    )
    assert Reg.IDR6 == 0x190
    assert PAGE1_OFFSET == 0x10000 and SMMU_MMIO_SIZE == 0x20000
    assert (Reg.EVENTQ_PROD, Reg.EVENTQ_CONS) == (0x100A8, 0x100AC)
    assert (Reg.PRIQ_PROD, Reg.PRIQ_CONS) == (0x100C8, 0x100CC)


def test_register_sizes() -> None:
    for reg in (Reg.STRTAB_BASE, Reg.CMDQ_BASE, Reg.EVENTQ_BASE, Reg.PRIQ_BASE, Reg.GERROR_IRQ_CFG0):
        assert REG_SIZE[reg] == 8
    for reg in (Reg.IDR0, Reg.CR0, Reg.CMDQ_PROD, Reg.EVENTQ_PROD, Reg.GERROR_IRQ_CFG1):
        assert REG_SIZE[reg] == 4
    assert set(REG_SIZE) == set(Reg)
    # 64-bit registers do not overlap the next register.
    offsets = sorted(int(r) for r in Reg)
    for reg in Reg:
        nxt = [o for o in offsets if o > reg]
        assert not nxt or reg + REG_SIZE[reg] <= nxt[0], reg.name


def test_ack_and_n_registers_share_layouts() -> None:
    assert REGISTER_LAYOUTS[Reg.CR0ACK] is CR0
    assert REGISTER_LAYOUTS[Reg.GERRORN] is GERROR
    assert REGISTER_LAYOUTS[Reg.IRQ_CTRLACK] is REGISTER_LAYOUTS[Reg.IRQ_CTRL]


def test_idr0_known_value() -> None:
    value = (
        1 << 0  # S2P
        | 1 << 1  # S1P
        | 0b10 << 2  # TTF = AArch64
        | 1 << 4  # COHACC
        | 1 << 9  # HYP
        | 1 << 10  # ATS
        | 1 << 12  # ASID16
        | 1 << 13  # MSI
        | 1 << 18  # VMID16
        | 1 << 19  # CD2L
        | 0b10 << 21  # TTENDIAN = little-endian only
        | 0b01 << 24  # STALL_MODEL = terminate only
        | 0b01 << 27  # ST_LEVEL = two-level
        | 1 << 30  # RME_IMPL
    )
    d = IDR0.decode(value)
    assert d["S2P"] == d["S1P"] == d["COHACC"] == d["HYP"] == d["ATS"] == 1
    assert d["ASID16"] == d["MSI"] == d["VMID16"] == d["CD2L"] == d["RME_IMPL"] == 1
    assert d["TTF"] is Ttf.AARCH64
    assert d["TTENDIAN"] is TtEndian.LE
    assert d["STALL_MODEL"] is StallModel.TERMINATE
    assert d["ST_LEVEL"] == 1
    assert d["BTM"] == d["PRI"] == d["SEV"] == d["TERM_MODEL"] == 0
    assert (
        IDR0.encode(
            S2P=1,
            S1P=1,
            TTF=2,
            COHACC=1,
            HYP=1,
            ATS=1,
            ASID16=1,
            MSI=1,
            VMID16=1,
            CD2L=1,
            TTENDIAN=2,
            STALL_MODEL=1,
            ST_LEVEL=1,
            RME_IMPL=1,
        )
        == value
    )


def test_idr1_and_idr5_known_values() -> None:
    # SIDSIZE=16, SSIDSIZE=20, PRIQS=8, EVENTQS=19, CMDQS=19
    idr1 = 16 | 20 << 6 | 8 << 11 | 19 << 16 | 19 << 21
    assert IDR1.decode(idr1) == {
        **IDR1.decode(0),
        "SIDSIZE": 16,
        "SSIDSIZE": 20,
        "PRIQS": 8,
        "EVENTQS": 19,
        "CMDQS": 19,
    }
    # OAS=48 bits, 4K and 64K granules, STALL_MAX=0x80
    idr5 = 0b101 | 1 << 4 | 1 << 6 | 0x80 << 16
    assert IDR5.encode(OAS=5, GRAN4K=1, GRAN64K=1, STALL_MAX=0x80) == idr5
    assert IDR5.decode(idr5)["GRAN16K"] == 0


def test_cr0_and_cr1() -> None:
    value = 1 << 0 | 1 << 2 | 1 << 3 | 0b011 << 6  # SMMUEN, EVENTQEN, CMDQEN, VMW=3
    assert CR0.encode(SMMUEN=1, EVENTQEN=1, CMDQEN=1, VMW=3) == value
    assert CR0.decode(value)["PRIQEN"] == 0 and CR0.decode(value)["ATSCHK"] == 0
    assert CR0.encode(DPT_WALK_EN=1) == 1 << 10
    # Linux's CR1 setup: WB queues and tables, inner shareable.
    cr1 = 1 << 0 | 1 << 2 | 3 << 4 | 1 << 6 | 1 << 8 | 3 << 10
    d = CR1.decode(cr1)
    assert d["QUEUE_IC"] is QueueCacheability.WB and d["TABLE_OC"] is QueueCacheability.WB
    assert d["QUEUE_SH"] is Shareability.ISH and d["TABLE_SH"] is Shareability.ISH


def test_gbpa() -> None:
    # QEMU's reset value: SHCFG = use incoming.
    assert GBPA.decode(0x1000)["SHCFG"] is Shcfg.INCOMING
    value = 1 << 31 | 1 << 20 | 0b10 << 18 | 0b11 << 16 | 0b11 << 12 | 0b1010 << 8 | 1 << 4 | 0xF
    assert (
        GBPA.encode(UPDATE=1, ABORT=1, INSTCFG=2, PRIVCFG=3, SHCFG=3, ALLOCCFG=0b1010, MTCFG=1, MEMATTR=0xF)
        == value
    )
    assert GBPA.reserved_bits(1 << 14) == 1 << 14  # bits [15:14] are RES0


def test_gerror_bits() -> None:
    assert GERROR.encode(CMDQ_ERR=1, SFM_ERR=1, DPT_ERR=1) == 1 << 0 | 1 << 8 | 1 << 10
    assert GERROR.reserved_bits(1 << 1) == 1 << 1  # bit 1 is not an error


def test_cmdq_cons_error() -> None:
    value = 1 << 24 | 5  # ERR = CERROR_ILL, RD = 5
    assert CMDQ_CONS.decode(value) == {"RD": 5, "ERR": CmdqError.ILL}
    assert CMDQ_CONS.encode(RD=5, ERR=CmdqError.ILL) == value
    assert CMDQ_CONS.decode(3 << 24)["ERR"] is CmdqError.ATC_INV_SYNC


def test_strtab_base_and_cfg() -> None:
    cfg = 1 << 16 | 8 << 6 | 16  # FMT = 2-level, SPLIT = 8, LOG2SIZE = 16
    assert STRTAB_BASE_CFG.decode(cfg) == {"LOG2SIZE": 16, "SPLIT": 8, "FMT": StrtabFmt.TWO_LEVEL}
    assert STRTAB_BASE_CFG.encode(LOG2SIZE=16, SPLIT=8, FMT=1) == cfg
    base = 1 << 62 | 0x8000_0040  # RA, ADDR holds address bits [55:6] in place
    assert STRTAB_BASE.ADDR.get_address(base) == 0x8000_0040
    assert STRTAB_BASE.decode(base)["RA"] == 1


def test_queue_bases_and_pointers() -> None:
    base = 0x4000_0000 | 8  # ADDR[55:5], LOG2SIZE = 8
    assert CMDQ_BASE.decode(base)["LOG2SIZE"] == 8
    assert CMDQ_BASE.ADDR.get_address(base) == 0x4000_0000
    assert CMDQ_BASE.encode(LOG2SIZE=8, ADDR=0x4000_0000 >> 5) == base
    assert EVENTQ_PROD.encode(OVFLG=1, WR=0x105) == 1 << 31 | 0x105


def test_irq_cfg() -> None:
    assert IRQ_CFG0.ADDR.get_address(0x0800_0040) == 0x0800_0040
    assert IRQ_CFG0.reserved_bits(0b11) == 0b11  # ADDR starts at bit 2
    assert IRQ_CFG2.encode(SH=3, MEMATTR=0xF, LO=1) == 1 << 31 | 3 << 4 | 0xF


def test_oas_encoding() -> None:
    assert OAS_BITS == {0: 32, 1: 36, 2: 40, 3: 42, 4: 44, 5: 48, 6: 52, 7: 56}
    assert oas_encoding(48) == 5 and oas_encoding(32) == 0 and oas_encoding(56) == 7
    with pytest.raises(ValueError):
        oas_encoding(47)
