"""Stream table and context descriptor structures (IHI 0070 §5): L1STD, STE, L1CD, CD.

Bit numbers are absolute within the structure, as the spec writes them (an STE is 512 bits,
so ``S2TTB[243:196]`` sits in dword 3). Structures are little-endian u64 arrays in memory.
"""

from __future__ import annotations

from enum import IntEnum

from pkvm_smmu.arch._bitfield import Field, Layout
from pkvm_smmu.arch.registers import Instcfg, Oas, Privcfg, Shareability, Shcfg

STE_SIZE = 64
CD_SIZE = 64
L1STD_SIZE = 8
L1CD_SIZE = 8


class SteConfig(IntEnum):
    ABORT = 0  # 0b0xx all behave as abort
    BYPASS = 4
    S1_TRANS = 5
    S2_TRANS = 6
    NESTED = 7


class S1Fmt(IntEnum):
    LINEAR = 0
    TWO_LEVEL_4K = 1  # 4 KB leaf tables of 64 CDs
    TWO_LEVEL_64K = 2  # 64 KB leaf tables of 1024 CDs


class S1Dss(IntEnum):
    TERMINATE = 0
    BYPASS = 1
    SSID0 = 2


class Eats(IntEnum):
    ABT = 0
    TRANS = 1
    S1CHK = 2  # split-stage ATS
    TRANS_DPT = 3


class Strw(IntEnum):
    NSEL1 = 0
    EL3 = 1
    EL2 = 2


class Cacheability(IntEnum):
    """Walk/fetch cacheability (S1CIR/S1COR, S2IR0/S2OR0, CD IRn/ORn): the TCR encoding."""

    NC = 0
    WBRA = 1
    WTRA = 2
    WB = 3  # write-back, no read-allocate


class S2Tg(IntEnum):
    G4K = 0
    G64K = 1
    G16K = 2


class Tg0(IntEnum):
    G4K = 0
    G64K = 1
    G16K = 2


class Tg1(IntEnum):
    """TG1 uses TCR_EL1.TG1's encoding, unlike TG0."""

    G16K = 1
    G4K = 2
    G64K = 3


class Nscfg(IntEnum):
    INCOMING = 0
    SECURE = 2
    NONSECURE = 3


class L1STD(Layout):
    """Level-1 stream table descriptor: SPAN=0 invalid, else 2^(SPAN-1) STEs at L2PTR."""

    SPAN = Field(4, 0)
    L2PTR = Field(55, 6, addr_lo=6)


class L1CD(Layout):
    V = Field(0)
    L2PTR = Field(55, 12, addr_lo=12)


class STE(Layout):
    WIDTH = 512
    # dword 0
    V = Field(0)
    CONFIG = Field(3, 1, SteConfig)
    S1FMT = Field(5, 4, S1Fmt)
    S1CONTEXTPTR = Field(55, 6, addr_lo=6)
    S1CDMAX = Field(63, 59)
    # dword 1
    S1DSS = Field(65, 64, S1Dss)
    S1CIR = Field(67, 66, Cacheability)
    S1COR = Field(69, 68, Cacheability)
    S1CSH = Field(71, 70, Shareability)
    S2HWU59 = Field(72)
    S2HWU60 = Field(73)
    S2HWU61 = Field(74)
    S2HWU62 = Field(75)
    DRE = Field(76)
    CONT = Field(80, 77)
    DCP = Field(81)
    PPAR = Field(82)
    MEV = Field(83)
    SW_RESERVED = Field(87, 84)
    S1PIE = Field(88)
    S2FWB = Field(89)
    S1MPAM = Field(90)
    S1STALLD = Field(91)
    EATS = Field(93, 92, Eats)
    STRW = Field(95, 94, Strw)
    MEMATTR = Field(99, 96)
    MTCFG = Field(100)
    ALLOCCFG = Field(104, 101)
    SHCFG = Field(109, 108, Shcfg)
    NSCFG = Field(111, 110, Nscfg)
    PRIVCFG = Field(113, 112, Privcfg)
    INSTCFG = Field(115, 114, Instcfg)
    IMPDEF0 = Field(127, 116)
    # dword 2: S2VMID and the VTCR-like block
    S2VMID = Field(143, 128)
    S2T0SZ = Field(165, 160)
    S2SL0 = Field(167, 166)
    S2IR0 = Field(169, 168, Cacheability)
    S2OR0 = Field(171, 170, Cacheability)
    S2SH0 = Field(173, 172, Shareability)
    S2TG = Field(175, 174, S2Tg)
    S2PS = Field(178, 176, Oas)
    S2AA64 = Field(179)
    S2ENDI = Field(180)
    S2AFFD = Field(181)
    S2PTW = Field(182)
    S2HD = Field(183)
    S2HA = Field(184)
    S2S = Field(185)
    S2R = Field(186)
    S2HAFT = Field(187)
    S2PIE = Field(188)
    S2POE = Field(189)
    DPT_VMATCH = Field(191, 190)
    # dword 3
    S2NSW = Field(192)
    S2NSA = Field(193)
    S2SL0_2 = Field(194)
    S2DS = Field(195)
    S2TTB = Field(243, 196, addr_lo=4)  # address bits [51:4]; [247:244] RES0 without D128
    S2SKL = Field(254, 253)
    # dwords 4-7
    IMPDEF1 = Field(271, 256)
    PARTID = Field(287, 272)
    S_S2T0SZ = Field(293, 288)
    S_S2SL0 = Field(295, 294)
    S_S2TG = Field(303, 302, S2Tg)
    MECID = Field(319, 304)
    PMG = Field(327, 320)
    MPAM_NS = Field(328)
    ASSUREDONLY = Field(329)
    TL0 = Field(330)
    TL1 = Field(331)
    VMSPTR = Field(375, 332, addr_lo=12)
    S2SW = Field(384)
    S2SA = Field(385)
    S_S2SL0_2 = Field(386)
    S_S2TTB = Field(435, 388, addr_lo=4)
    S_S2SKL = Field(446, 445)
    S2POI = Field(511, 448)


class CD(Layout):
    WIDTH = 512
    # dword 0: TCR-like fields, V, and the ASID
    T0SZ = Field(5, 0)
    TG0 = Field(7, 6, Tg0)
    IR0 = Field(9, 8, Cacheability)
    OR0 = Field(11, 10, Cacheability)
    SH0 = Field(13, 12, Shareability)
    EPD0 = Field(14)
    ENDI = Field(15)
    T1SZ = Field(21, 16)
    TG1 = Field(23, 22, Tg1)
    IR1 = Field(25, 24, Cacheability)
    OR1 = Field(27, 26, Cacheability)
    SH1 = Field(29, 28, Shareability)
    EPD1 = Field(30)
    V = Field(31)
    IPS = Field(34, 32, Oas)
    AFFD = Field(35)
    WXN = Field(36)
    UWXN = Field(37)
    TBI0 = Field(38)
    TBI1 = Field(39)
    PAN = Field(40)
    AA64 = Field(41)
    HD = Field(42)
    HA = Field(43)
    S = Field(44)
    R = Field(45)
    A = Field(46)
    ASET = Field(47)
    ASID = Field(63, 48)
    # dword 1
    NSCFG0 = Field(64)
    HAD0 = Field(65)
    E0PD0 = Field(66)
    HAFT = Field(67)
    TTB0 = Field(115, 68, addr_lo=4)  # address bits [51:4]
    PNCH = Field(122)
    EPAN = Field(123)
    HWU059 = Field(124)
    HWU060 = Field(125)
    HWU061 = Field(126)
    HWU062 = Field(127)
    # dword 2
    NSCFG1 = Field(128)
    HAD1 = Field(129)
    E0PD1 = Field(130)
    AIE = Field(131)
    TTB1 = Field(179, 132, addr_lo=4)
    DS = Field(186)
    PIE = Field(187)
    HWU159 = Field(188)
    HWU160 = Field(189)
    HWU161 = Field(190)
    HWU162 = Field(191)
    # dwords 3-7
    MAIR0 = Field(223, 192)
    MAIR1 = Field(255, 224)
    AMAIR0 = Field(287, 256)
    AMAIR1 = Field(319, 288)
    IMPDEF = Field(351, 320)
    PARTID = Field(367, 352)
    PMG = Field(375, 368)
    PIIU = Field(431, 384)  # 16 x 3-bit interpretations
    PIIP = Field(495, 448)


def cd_mair(cd: int) -> int:
    """The 64-bit MAIR a CD holds (MAIR0 is the low half, as in MAIR_EL1)."""
    return CD.MAIR0.get(cd) | CD.MAIR1.get(cd) << 32


__all__ = [
    "CD",
    "CD_SIZE",
    "L1CD",
    "L1CD_SIZE",
    "L1STD",
    "L1STD_SIZE",
    "STE",
    "STE_SIZE",
    "Cacheability",
    "Eats",
    "Instcfg",
    "Nscfg",
    "Privcfg",
    "S1Dss",
    "S1Fmt",
    "S2Tg",
    "Shcfg",
    "SteConfig",
    "Strw",
    "Tg0",
    "Tg1",
    "cd_mair",
]
