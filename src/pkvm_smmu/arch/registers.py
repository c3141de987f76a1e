"""SMMUv3 Non-secure programming interface: register offsets and field layouts (IHI 0070 §6).

Offsets are from the SMMU base. Page 1 registers carry their absolute offset (Page 0 + 0x10000).
A 64-bit register has one ``Reg`` entry, at its low half's offset; ``REG_SIZE`` says 4 or 8.
"""

from __future__ import annotations

from enum import IntEnum

from pkvm_smmu.arch._bitfield import Field, Layout

PAGE1_OFFSET = 0x10000
SMMU_MMIO_SIZE = 0x20000  # the two mandatory 64 KB pages


class Reg(IntEnum):
    IDR0 = 0x000
    IDR1 = 0x004
    IDR2 = 0x008
    IDR3 = 0x00C
    IDR4 = 0x010
    IDR5 = 0x014
    IIDR = 0x018
    AIDR = 0x01C
    CR0 = 0x020
    CR0ACK = 0x024
    CR1 = 0x028
    CR2 = 0x02C
    S2PII = 0x030
    STATUSR = 0x040
    GBPA = 0x044
    AGBPA = 0x048
    IRQ_CTRL = 0x050
    IRQ_CTRLACK = 0x054
    GERROR = 0x060
    GERRORN = 0x064
    GERROR_IRQ_CFG0 = 0x068
    GERROR_IRQ_CFG1 = 0x070
    GERROR_IRQ_CFG2 = 0x074
    STRTAB_BASE = 0x080
    STRTAB_BASE_CFG = 0x088
    CMDQ_BASE = 0x090
    CMDQ_PROD = 0x098
    CMDQ_CONS = 0x09C
    EVENTQ_BASE = 0x0A0
    EVENTQ_IRQ_CFG0 = 0x0B0
    EVENTQ_IRQ_CFG1 = 0x0B8
    EVENTQ_IRQ_CFG2 = 0x0BC
    PRIQ_BASE = 0x0C0
    PRIQ_IRQ_CFG0 = 0x0D0
    PRIQ_IRQ_CFG1 = 0x0D8
    PRIQ_IRQ_CFG2 = 0x0DC
    GATOS_CTRL = 0x100
    GATOS_SID = 0x108
    GATOS_ADDR = 0x110
    GATOS_PAR = 0x118
    MPAMIDR = 0x130
    GMPAM = 0x138
    GBPMPAM = 0x13C
    VATOS_SEL = 0x180
    IDR6 = 0x190
    DPT_BASE = 0x200
    DPT_BASE_CFG = 0x208
    DPT_CFG_FAR = 0x210
    # CoreSight-style identification block
    PIDR4 = 0xFD0
    PIDR5 = 0xFD4
    PIDR6 = 0xFD8
    PIDR7 = 0xFDC
    PIDR0 = 0xFE0
    PIDR1 = 0xFE4
    PIDR2 = 0xFE8
    PIDR3 = 0xFEC
    CIDR0 = 0xFF0
    CIDR1 = 0xFF4
    CIDR2 = 0xFF8
    CIDR3 = 0xFFC
    # Page 1 (Page 0 offsets 0xA8/0xAC/0xC8/0xCC are only optional aliases)
    EVENTQ_PROD = PAGE1_OFFSET + 0x0A8
    EVENTQ_CONS = PAGE1_OFFSET + 0x0AC
    PRIQ_PROD = PAGE1_OFFSET + 0x0C8
    PRIQ_CONS = PAGE1_OFFSET + 0x0CC


_REG64 = {
    Reg.S2PII,
    Reg.GERROR_IRQ_CFG0,
    Reg.STRTAB_BASE,
    Reg.CMDQ_BASE,
    Reg.EVENTQ_BASE,
    Reg.EVENTQ_IRQ_CFG0,
    Reg.PRIQ_BASE,
    Reg.PRIQ_IRQ_CFG0,
    Reg.GATOS_SID,
    Reg.GATOS_ADDR,
    Reg.GATOS_PAR,
    Reg.DPT_BASE,
    Reg.DPT_CFG_FAR,
}
REG_SIZE: dict[Reg, int] = {r: 8 if r in _REG64 else 4 for r in Reg}


# ---- enums for multi-valued fields -------------------------------------------------------------


class Ttf(IntEnum):
    AARCH32 = 1  # VMSAv8-32 LPAE
    AARCH64 = 2
    AARCH32_64 = 3


class Httu(IntEnum):
    NONE = 0
    HA = 1  # access flag
    HAD = 2  # access flag and dirty state
    HAFT = 3  # also table-descriptor access flag


class TtEndian(IntEnum):
    MIXED = 0
    LE = 2
    BE = 3


class StallModel(IntEnum):
    STALL = 0  # stall and terminate both supported
    TERMINATE = 1  # stall not supported
    FORCE = 2  # stall forced


class StLevel(IntEnum):
    LINEAR = 0
    TWO_LEVEL = 1


class Bbml(IntEnum):
    NONE = 0
    LEVEL1 = 1
    LEVEL2 = 2


class Oas(IntEnum):
    """Output/physical address size encoding, shared by IDR5.OAS, STE.S2PS and CD.IPS."""

    BITS_32 = 0
    BITS_36 = 1
    BITS_40 = 2
    BITS_42 = 3
    BITS_44 = 4
    BITS_48 = 5
    BITS_52 = 6
    BITS_56 = 7


OAS_BITS: dict[int, int] = {0: 32, 1: 36, 2: 40, 3: 42, 4: 44, 5: 48, 6: 52, 7: 56}


def oas_encoding(bits: int) -> int:
    """The 3-bit size encoding for an address size in bits."""
    for enc, size in OAS_BITS.items():
        if size == bits:
            return enc
    raise ValueError(f"{bits} is not an architected address size")


class Vax(IntEnum):
    VA48 = 0
    VA52 = 1
    VA56 = 2


class QueueCacheability(IntEnum):
    """CR1 cacheability (not the TCR encoding)."""

    NC = 0
    WB = 1
    WT = 2


class Shareability(IntEnum):
    NSH = 0
    OSH = 2
    ISH = 3


class Shcfg(IntEnum):
    """Shareability override (GBPA.SHCFG, STE.SHCFG)."""

    NSH = 0
    INCOMING = 1
    OSH = 2
    ISH = 3


class Privcfg(IntEnum):
    INCOMING = 0
    UNPRIV = 2
    PRIV = 3


class Instcfg(IntEnum):
    INCOMING = 0
    DATA = 2
    INSTR = 3


class StrtabFmt(IntEnum):
    LINEAR = 0
    TWO_LEVEL = 1


class CmdqError(IntEnum):
    NONE = 0
    ILL = 1
    ABT = 2
    ATC_INV_SYNC = 3


# ---- ID registers -----------------------------------------------------------------------------


class IDR0(Layout):
    WIDTH = 32
    S2P = Field(0)
    S1P = Field(1)
    TTF = Field(3, 2, Ttf)
    COHACC = Field(4)
    BTM = Field(5)
    HTTU = Field(7, 6, Httu)
    DORMHINT = Field(8)
    HYP = Field(9)
    ATS = Field(10)
    NS1ATS = Field(11)
    ASID16 = Field(12)
    MSI = Field(13)
    SEV = Field(14)
    ATOS = Field(15)
    PRI = Field(16)
    VMW = Field(17)
    VMID16 = Field(18)
    CD2L = Field(19)
    VATOS = Field(20)
    TTENDIAN = Field(22, 21, TtEndian)
    ATSRECERR = Field(23)
    STALL_MODEL = Field(25, 24, StallModel)
    TERM_MODEL = Field(26)
    ST_LEVEL = Field(28, 27, StLevel)
    RME_IMPL = Field(30)


class IDR1(Layout):
    WIDTH = 32
    SIDSIZE = Field(5, 0)
    SSIDSIZE = Field(10, 6)
    PRIQS = Field(15, 11)
    EVENTQS = Field(20, 16)
    CMDQS = Field(25, 21)
    ATTR_PERMS_OVR = Field(26)
    ATTR_TYPES_OVR = Field(27)
    REL = Field(28)
    QUEUES_PRESET = Field(29)
    TABLES_PRESET = Field(30)
    ECMDQ = Field(31)


class IDR2(Layout):
    WIDTH = 32
    BA_VATOS = Field(9, 0)


class IDR3(Layout):
    WIDTH = 32
    HAD = Field(2)
    PBHA = Field(3)
    XNX = Field(4)
    PPS = Field(5)
    MPAM = Field(7)
    FWB = Field(8)
    STT = Field(9)
    RIL = Field(10)
    BBML = Field(12, 11, Bbml)
    E0PD = Field(13)
    PTWNNC = Field(14)
    DPT = Field(15)
    PASIDTT = Field(16)
    EPAN = Field(17)
    S1PI = Field(18)
    S2PI = Field(19)


class IDR5(Layout):
    WIDTH = 32
    OAS = Field(2, 0, Oas)
    GRAN4K = Field(4)
    GRAN16K = Field(5)
    GRAN64K = Field(6)
    DS = Field(7)
    D128 = Field(8)
    VAX = Field(11, 10, Vax)
    STALL_MAX = Field(31, 16)


class IIDR(Layout):
    WIDTH = 32
    IMPLEMENTER = Field(11, 0)
    REVISION = Field(15, 12)
    VARIANT = Field(19, 16)
    PRODUCTID = Field(31, 20)


class AIDR(Layout):
    WIDTH = 32
    ARCHMINORREV = Field(3, 0)
    ARCHMAJORREV = Field(7, 4)


# ---- control and status -----------------------------------------------------------------------


class CR0(Layout):
    """Also the layout of CR0ACK."""

    WIDTH = 32
    SMMUEN = Field(0)
    PRIQEN = Field(1)
    EVENTQEN = Field(2)
    CMDQEN = Field(3)
    ATSCHK = Field(4)
    VMW = Field(8, 6)
    DPT_WALK_EN = Field(10)


class CR1(Layout):
    WIDTH = 32
    QUEUE_IC = Field(1, 0, QueueCacheability)
    QUEUE_OC = Field(3, 2, QueueCacheability)
    QUEUE_SH = Field(5, 4, Shareability)
    TABLE_IC = Field(7, 6, QueueCacheability)
    TABLE_OC = Field(9, 8, QueueCacheability)
    TABLE_SH = Field(11, 10, Shareability)


class CR2(Layout):
    WIDTH = 32
    E2H = Field(0)
    RECINVSID = Field(1)
    PTM = Field(2)
    REC_CFG_ATS = Field(3)


class STATUSR(Layout):
    WIDTH = 32
    DORMANT = Field(0)


class GBPA(Layout):
    WIDTH = 32
    MEMATTR = Field(3, 0)
    MTCFG = Field(4)
    ALLOCCFG = Field(11, 8)
    SHCFG = Field(13, 12, Shcfg)
    PRIVCFG = Field(17, 16, Privcfg)
    INSTCFG = Field(19, 18, Instcfg)
    ABORT = Field(20)
    UPDATE = Field(31)


class IRQ_CTRL(Layout):
    """Also the layout of IRQ_CTRLACK."""

    WIDTH = 32
    GERROR_IRQEN = Field(0)
    PRIQ_IRQEN = Field(1)
    EVENTQ_IRQEN = Field(2)


class GERROR(Layout):
    """Also the layout of GERRORN (an error is active while the two bits differ)."""

    WIDTH = 32
    CMDQ_ERR = Field(0)
    EVENTQ_ABT_ERR = Field(2)
    PRIQ_ABT_ERR = Field(3)
    MSI_CMDQ_ABT_ERR = Field(4)
    MSI_EVENTQ_ABT_ERR = Field(5)
    MSI_PRIQ_ABT_ERR = Field(6)
    MSI_GERROR_ABT_ERR = Field(7)
    SFM_ERR = Field(8)
    CMDQP_ERR = Field(9)
    DPT_ERR = Field(10)


# ---- MSI configuration (GERROR_, EVENTQ_, PRIQ_IRQ_CFGn) ---------------------------------------


class IRQ_CFG0(Layout):
    WIDTH = 64
    ADDR = Field(55, 2, addr_lo=2)


class IRQ_CFG1(Layout):
    WIDTH = 32
    DATA = Field(31, 0)


class IRQ_CFG2(Layout):
    """LO exists only in PRIQ_IRQ_CFG2 (RES0 elsewhere)."""

    WIDTH = 32
    MEMATTR = Field(3, 0)
    SH = Field(5, 4, Shareability)
    LO = Field(31)


# ---- stream table and queues ------------------------------------------------------------------


class STRTAB_BASE(Layout):
    WIDTH = 64
    ADDR = Field(55, 6, addr_lo=6)
    RA = Field(62)


class STRTAB_BASE_CFG(Layout):
    WIDTH = 32
    LOG2SIZE = Field(5, 0)
    SPLIT = Field(10, 6)
    FMT = Field(17, 16, StrtabFmt)


class CMDQ_BASE(Layout):
    WIDTH = 64
    LOG2SIZE = Field(4, 0)
    ADDR = Field(55, 5, addr_lo=5)
    RA = Field(62)


class EVENTQ_BASE(Layout):
    WIDTH = 64
    LOG2SIZE = Field(4, 0)
    ADDR = Field(55, 5, addr_lo=5)
    WA = Field(62)


class PRIQ_BASE(EVENTQ_BASE):
    pass


class CMDQ_PROD(Layout):
    WIDTH = 32
    WR = Field(19, 0)


class CMDQ_CONS(Layout):
    WIDTH = 32
    RD = Field(19, 0)
    ERR = Field(30, 24, CmdqError)


class EVENTQ_PROD(Layout):
    WIDTH = 32
    WR = Field(19, 0)
    OVFLG = Field(31)


class EVENTQ_CONS(Layout):
    WIDTH = 32
    RD = Field(19, 0)
    OVACKFLG = Field(31)


class PRIQ_PROD(EVENTQ_PROD):
    pass


class PRIQ_CONS(EVENTQ_CONS):
    pass


# Which layout decodes which register (ACK/N registers share their partner's layout).
REGISTER_LAYOUTS: dict[Reg, type[Layout]] = {
    Reg.IDR0: IDR0,
    Reg.IDR1: IDR1,
    Reg.IDR2: IDR2,
    Reg.IDR3: IDR3,
    Reg.IDR5: IDR5,
    Reg.IIDR: IIDR,
    Reg.AIDR: AIDR,
    Reg.CR0: CR0,
    Reg.CR0ACK: CR0,
    Reg.CR1: CR1,
    Reg.CR2: CR2,
    Reg.STATUSR: STATUSR,
    Reg.GBPA: GBPA,
    Reg.IRQ_CTRL: IRQ_CTRL,
    Reg.IRQ_CTRLACK: IRQ_CTRL,
    Reg.GERROR: GERROR,
    Reg.GERRORN: GERROR,
    Reg.GERROR_IRQ_CFG0: IRQ_CFG0,
    Reg.GERROR_IRQ_CFG1: IRQ_CFG1,
    Reg.GERROR_IRQ_CFG2: IRQ_CFG2,
    Reg.STRTAB_BASE: STRTAB_BASE,
    Reg.STRTAB_BASE_CFG: STRTAB_BASE_CFG,
    Reg.CMDQ_BASE: CMDQ_BASE,
    Reg.CMDQ_PROD: CMDQ_PROD,
    Reg.CMDQ_CONS: CMDQ_CONS,
    Reg.EVENTQ_BASE: EVENTQ_BASE,
    Reg.EVENTQ_PROD: EVENTQ_PROD,
    Reg.EVENTQ_CONS: EVENTQ_CONS,
    Reg.EVENTQ_IRQ_CFG0: IRQ_CFG0,
    Reg.EVENTQ_IRQ_CFG1: IRQ_CFG1,
    Reg.EVENTQ_IRQ_CFG2: IRQ_CFG2,
    Reg.PRIQ_BASE: PRIQ_BASE,
    Reg.PRIQ_PROD: PRIQ_PROD,
    Reg.PRIQ_CONS: PRIQ_CONS,
    Reg.PRIQ_IRQ_CFG0: IRQ_CFG0,
    Reg.PRIQ_IRQ_CFG1: IRQ_CFG1,
    Reg.PRIQ_IRQ_CFG2: IRQ_CFG2,
}
