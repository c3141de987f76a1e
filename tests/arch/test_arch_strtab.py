"""STE, CD, L1STD and L1CD against entries built by hand from the spec's bit numbers (§5)."""

from __future__ import annotations

from pkvm_smmu.arch.registers import Oas, Shareability, Shcfg
from pkvm_smmu.arch.strtab import (
    CD,
    L1CD,
    L1STD,
    STE,
    Cacheability,
    Eats,
    S1Dss,
    S1Fmt,
    S2Tg,
    SteConfig,
    Strw,
    Tg0,
    Tg1,
    cd_mair,
)


def words(*dwords: int) -> int:
    return sum(w << (64 * i) for i, w in enumerate(dwords))


def test_ste_stage1() -> None:
    w0 = (
        1 << 0  # V
        | 0b101 << 1  # CONFIG = S1_TRANS
        | 0b01 << 4  # S1FMT = 2-level, 4K leaves
        | 0x4000_1000  # S1CONTEXTPTR holds address bits [55:6] in place
        | 3 << 59  # S1CDMAX = 3
    )
    w1 = (
        0b10 << 0  # S1DSS = SSID0 (bit 64)
        | 0b01 << 2  # S1CIR = WBRA (bit 66)
        | 0b01 << 4  # S1COR = WBRA (bit 68)
        | 0b11 << 6  # S1CSH = ISH (bit 70)
        | 1 << 27  # S1STALLD (bit 91)
        | 0b01 << 28  # EATS = full ATS (bit 92)
        | 0b10 << 30  # STRW = EL2 (bit 94)
        | 0b01 << 44  # SHCFG = incoming (bit 108)
    )
    ste = words(w0, w1)
    d = STE.decode(ste)
    assert d["V"] == 1 and d["CONFIG"] is SteConfig.S1_TRANS and d["S1FMT"] is S1Fmt.TWO_LEVEL_4K
    assert STE.S1CONTEXTPTR.get_address(ste) == 0x4000_1000
    assert d["S1CDMAX"] == 3
    assert d["S1DSS"] is S1Dss.SSID0
    assert d["S1CIR"] is Cacheability.WBRA and d["S1COR"] is Cacheability.WBRA
    assert d["S1CSH"] is Shareability.ISH
    assert d["S1STALLD"] == 1 and d["EATS"] is Eats.TRANS and d["STRW"] is Strw.EL2
    assert d["SHCFG"] is Shcfg.INCOMING
    assert d["S2VMID"] == 0 and d["S2TTB"] == 0
    built = STE.encode(
        V=1,
        CONFIG=SteConfig.S1_TRANS,
        S1FMT=1,
        S1CONTEXTPTR=0x4000_1000 >> 6,
        S1CDMAX=3,
        S1DSS=2,
        S1CIR=1,
        S1COR=1,
        S1CSH=3,
        S1STALLD=1,
        EATS=1,
        STRW=2,
        SHCFG=1,
    )
    assert built == ste
    assert STE.pretty(ste).startswith("STE(V=1 CONFIG=S1_TRANS S1FMT=TWO_LEVEL_4K S1CONTEXTPTR=0x40001000")


def test_ste_dword1_single_bits() -> None:
    # DRE at 76 and CONT at [80:77] as the G.b field list has them; PPAR, MEV, S2FWB as in Linux.
    assert STE.encode(DRE=1) == 1 << 76
    assert STE.encode(CONT=0b1010) == 0b1010 << 77
    assert STE.encode(DCP=1) == 1 << 81
    assert STE.encode(PPAR=1) == 1 << (64 + 18)
    assert STE.encode(MEV=1) == 1 << (64 + 19)
    assert STE.encode(S2FWB=1) == 1 << (64 + 25)
    assert STE.encode(S1STALLD=1) == 1 << (64 + 27)
    assert STE.encode(MEMATTR=0xF, MTCFG=1, ALLOCCFG=0xF) == 0xF << 96 | 1 << 100 | 0xF << 101
    assert STE.encode(NSCFG=3, PRIVCFG=2, INSTCFG=2) == 3 << 110 | 2 << 112 | 2 << 114


def test_ste_stage2() -> None:
    w0 = 1 | 0b110 << 1  # V, CONFIG = S2_TRANS
    w2 = (
        0x42  # S2VMID (bit 128)
        | 24 << 32  # S2T0SZ = 24 (bit 160): 40-bit IPA
        | 0b01 << 38  # S2SL0 = 1 (bit 166)
        | 0b01 << 40  # S2IR0 = WBRA (bit 168)
        | 0b01 << 42  # S2OR0 = WBRA (bit 170)
        | 0b11 << 44  # S2SH0 = ISH (bit 172)
        | 0b00 << 46  # S2TG = 4K (bit 174)
        | 0b101 << 48  # S2PS = 48 bits (bit 176)
        | 1 << 51  # S2AA64 (bit 179)
        | 1 << 54  # S2PTW (bit 182)
        | 1 << 58  # S2R (bit 186)
    )
    w3 = 0x8_1234_5000  # S2TTB: dword 3 holds address bits [51:4] in place
    ste = words(w0, 0, w2, w3)
    d = STE.decode(ste)
    assert d["CONFIG"] is SteConfig.S2_TRANS
    assert d["S2VMID"] == 0x42 and d["S2T0SZ"] == 24 and d["S2SL0"] == 1
    assert d["S2IR0"] is Cacheability.WBRA and d["S2OR0"] is Cacheability.WBRA
    assert d["S2SH0"] is Shareability.ISH and d["S2TG"] is S2Tg.G4K and d["S2PS"] is Oas.BITS_48
    assert d["S2AA64"] == d["S2PTW"] == d["S2R"] == 1
    assert d["S2ENDI"] == d["S2AFFD"] == d["S2HD"] == d["S2HA"] == d["S2S"] == 0
    assert STE.S2TTB.get_address(ste) == 0x8_1234_5000
    built = STE.encode(
        V=1,
        CONFIG=6,
        S2VMID=0x42,
        S2T0SZ=24,
        S2SL0=1,
        S2IR0=1,
        S2OR0=1,
        S2SH0=3,
        S2TG=0,
        S2PS=5,
        S2AA64=1,
        S2PTW=1,
        S2R=1,
        S2TTB=0x8_1234_5000 >> 4,
    )
    assert built == ste
    assert STE.encode(S2TG=S2Tg.G64K, S2HD=1, S2HA=1, S2S=1) == 1 << 174 | 1 << 183 | 1 << 184 | 1 << 185


def test_ste_nested() -> None:
    ste = words(
        1 | 0b111 << 1 | 0x9000_0000,  # V, CONFIG = NESTED, S1CONTEXTPTR (an IPA here)
        0,
        7 | 1 << 51,  # S2VMID = 7, S2AA64
        0x7000_0000,  # S2TTB
    )
    d = STE.decode(ste)
    assert d["CONFIG"] is SteConfig.NESTED
    assert STE.S1CONTEXTPTR.get_address(ste) == 0x9000_0000
    assert STE.S2TTB.get_address(ste) == 0x7000_0000
    assert d["S2VMID"] == 7


def test_ste_upper_dwords() -> None:
    assert STE.encode(PARTID=0xABCD) == 0xABCD << 272
    assert STE.encode(PMG=0x5A) == 0x5A << 320
    assert STE.VMSPTR.insert_address(0x1234_5000) == 0x1234_5 << 332
    assert STE.encode(S2POI=1) == 1 << 448


def test_ste_bits_beyond_s2ttb_are_reserved() -> None:
    # Without D128, S2TTB bits [247:244] are RES0.
    assert STE.reserved_bits(1 << 244) == 1 << 244
    assert STE.reserved_bits(1 << 243) == 0


def test_cd() -> None:
    mair = 0x0000_0000_0404_FF44
    w0 = (
        16  # T0SZ = 16 (48-bit VA)
        | 0b00 << 6  # TG0 = 4K
        | 0b01 << 8  # IR0 = WBRA
        | 0b01 << 10  # OR0 = WBRA
        | 0b11 << 12  # SH0 = ISH
        | 0b10 << 22  # TG1 = 4K (TCR_EL1.TG1 encoding)
        | 1 << 30  # EPD1
        | 1 << 31  # V
        | 0b101 << 32  # IPS = 48 bits
        | 1 << 41  # AA64
        | 1 << 45  # R
        | 1 << 46  # A
        | 0x1234 << 48  # ASID
    )
    w1 = 0x8765_4000  # TTB0: dword 1 holds address bits [51:4] in place
    w3 = mair  # MAIR0 in [223:192], MAIR1 in [255:224]
    cd = words(w0, w1, 0, w3)
    d = CD.decode(cd)
    assert d["T0SZ"] == 16 and d["TG0"] is Tg0.G4K and d["TG1"] is Tg1.G4K
    assert d["IR0"] is Cacheability.WBRA and d["SH0"] is Shareability.ISH
    assert d["EPD1"] == d["V"] == d["AA64"] == d["R"] == d["A"] == 1
    assert d["EPD0"] == d["S"] == d["HA"] == d["HD"] == 0
    assert d["IPS"] is Oas.BITS_48
    assert d["ASID"] == 0x1234
    assert CD.TTB0.get_address(cd) == 0x8765_4000
    assert d["MAIR0"] == 0x0404_FF44 and d["MAIR1"] == 0
    assert cd_mair(cd) == mair
    assert cd_mair(words(0, 0, 0, 0x11 << 32 | 0x22)) == 0x11 << 32 | 0x22
    built = CD.encode(
        T0SZ=16,
        IR0=1,
        OR0=1,
        SH0=3,
        TG1=Tg1.G4K,
        EPD1=1,
        V=1,
        IPS=5,
        AA64=1,
        R=1,
        A=1,
        ASID=0x1234,
        TTB0=0x8765_4000 >> 4,
        MAIR0=0x0404_FF44,
    )
    assert built == cd


def test_cd_tg1_differs_from_tg0() -> None:
    assert CD.decode(0b01 << 6)["TG0"] is Tg0.G64K
    assert CD.decode(0b01 << 22)["TG1"] is Tg1.G16K
    assert CD.decode(0b11 << 22)["TG1"] is Tg1.G64K


def test_cd_dword1_and_dword2_fields() -> None:
    assert CD.encode(HAD0=1, HAFT=1, EPAN=1) == 1 << 65 | 1 << 67 | 1 << 123
    assert CD.TTB1.insert_address(0x1000) == 0x1000 << 128  # dword 2 holds it in place
    assert CD.encode(DS=1, PIE=1) == 1 << 186 | 1 << 187
    assert CD.encode(PARTID=0x77, PMG=0x3) == 0x77 << 352 | 0x3 << 368


def test_l1std() -> None:
    value = 0x1234_5000 | 9  # L2PTR in place, SPAN = 9 (256 STEs)
    assert L1STD.decode(value) == {"SPAN": 9, "L2PTR": 0x1234_5000 >> 6}
    assert L1STD.L2PTR.get_address(value) == 0x1234_5000
    assert L1STD.encode(SPAN=9, L2PTR=0x1234_5000 >> 6) == value
    assert L1STD.reserved_bits(1 << 5 | 1 << 56) == 1 << 5 | 1 << 56


def test_l1cd() -> None:
    value = 0x2_0000_3000 | 1  # L2PTR in place, V
    assert L1CD.decode(value) == {"V": 1, "L2PTR": 0x2_0000_3000 >> 12}
    assert L1CD.encode(V=1, L2PTR=0x2_0000_3000 >> 12) == value
    assert L1CD.reserved_bits(0xFFE) == 0xFFE
