"""Command queue entries (IHI 0070 §4): opcodes and one 128-bit layout per command.

Bit numbers are absolute within the 16-byte command, as the spec's figures draw them (dword 1
starts at bit 64). Checked against the G.b figures, Linux ``CMDQ_*`` masks and QEMU's extractors.

``build_command`` and ``decode_command`` speak byte addresses for address fields (ADDR, MSIADDR),
so ``build_command(*decode_command(v))`` rebuilds ``v``; ``Layout.encode``/``decode`` stay raw.
"""

from __future__ import annotations

from enum import IntEnum

from pkvm_smmu.arch._bitfield import Field, Layout
from pkvm_smmu.arch.registers import Shareability

CMD_SIZE = 16


class Opcode(IntEnum):
    PREFETCH_CONFIG = 0x01
    PREFETCH_ADDR = 0x02
    CFGI_STE = 0x03
    CFGI_STE_RANGE = 0x04  # RANGE=31 is CMD_CFGI_ALL
    CFGI_CD = 0x05
    CFGI_CD_ALL = 0x06
    CFGI_VMS_PIDM = 0x07
    TLBI_NH_ALL = 0x10
    TLBI_NH_ASID = 0x11
    TLBI_NH_VA = 0x12
    TLBI_NH_VAA = 0x13
    TLBI_EL3_ALL = 0x18
    TLBI_EL3_VA = 0x1A
    TLBI_EL2_ALL = 0x20
    TLBI_EL2_ASID = 0x21
    TLBI_EL2_VA = 0x22
    TLBI_EL2_VAA = 0x23
    TLBI_S12_VMALL = 0x28
    TLBI_S2_IPA = 0x2A
    TLBI_NSNH_ALL = 0x30
    ATC_INV = 0x40
    PRI_RESP = 0x41
    RESUME = 0x44
    STALL_TERM = 0x45
    SYNC = 0x46
    TLBI_S_EL2_ALL = 0x50
    TLBI_S_EL2_ASID = 0x51
    TLBI_S_EL2_VA = 0x52
    TLBI_S_EL2_VAA = 0x53
    TLBI_S_S12_VMALL = 0x58
    TLBI_S_S2_IPA = 0x5A
    TLBI_SNH_ALL = 0x60
    DPTI_ALL = 0x70
    DPTI_PA = 0x73


class SyncCs(IntEnum):
    NONE = 0
    IRQ = 1
    SEV = 2


class PriResp(IntEnum):
    FAILURE = 0  # ResponseFailure
    INVALID = 1  # InvalidRequest
    SUCCESS = 2


class TlbiTg(IntEnum):
    """TG of range/TTL invalidations (not the TCR encoding)."""

    ANY = 0
    G4K = 1
    G16K = 2
    G64K = 3


# ---- building blocks (single inheritance: a subclass's fields follow its base's) ---------------


class CMD_COMMON(Layout):
    """The fields shared by most commands; decodes an entry whose opcode is unknown."""

    WIDTH = 128
    OPCODE = Field(7, 0, Opcode)
    SSEC = Field(10)
    SSV = Field(11)
    SSID = Field(31, 12)
    SID = Field(63, 32)


class _Cmd(Layout):
    WIDTH = 128
    OPCODE = Field(7, 0, Opcode)


class _CmdSid(_Cmd):
    SSEC = Field(10)
    SID = Field(63, 32)


class _CmdSsid(_Cmd):
    SSEC = Field(10)
    SSV = Field(11)
    SSID = Field(31, 12)
    SID = Field(63, 32)


class _TlbiRange(_Cmd):
    """NUM/SCALE, Leaf, TTL128/TTL/TG and a VA of an address-based TLBI."""

    NUM = Field(16, 12)
    SCALE = Field(25, 20)  # 6 bits with IDR5.DS, bit 25 RES0 otherwise
    LEAF = Field(64)
    TTL128 = Field(71)
    TTL = Field(73, 72)
    TG = Field(75, 74, TlbiTg)
    ADDR = Field(127, 76, addr_lo=12)  # VA[63:12]


class _TlbiRangeIpa(_Cmd):
    NUM = Field(16, 12)
    SCALE = Field(25, 20)
    VMID = Field(47, 32)
    LEAF = Field(64)
    TTL128 = Field(71)
    TTL = Field(73, 72)
    TG = Field(75, 74, TlbiTg)
    ADDR = Field(119, 76, addr_lo=12)  # IPA[55:12]


# ---- prefetch and configuration invalidation ---------------------------------------------------


class CMD_PREFETCH_CONFIG(_CmdSsid):
    pass


class CMD_PREFETCH_ADDR(_CmdSsid):
    SIZE = Field(68, 64)
    STRIDE = Field(73, 69)
    NS = Field(75)
    ADDR = Field(127, 76, addr_lo=12)


class CMD_CFGI_STE(_CmdSid):
    LEAF = Field(64)


class CMD_CFGI_STE_RANGE(_CmdSid):
    RANGE = Field(68, 64)


class CMD_CFGI_CD(_CmdSid):
    SSID = Field(31, 12)  # no SSV: SSID is the CD table index
    LEAF = Field(64)


class CMD_CFGI_CD_ALL(_CmdSid):
    pass


class CMD_CFGI_VMS_PIDM(_Cmd):
    SSEC = Field(10)
    VMID = Field(47, 32)


# ---- TLB invalidation --------------------------------------------------------------------------


class CMD_TLBI_NH_ALL(_Cmd):
    VMID = Field(47, 32)


class CMD_TLBI_NH_ASID(_Cmd):
    VMID = Field(47, 32)
    ASID = Field(63, 48)


class CMD_TLBI_NH_VA(_TlbiRange):
    VMID = Field(47, 32)
    ASID = Field(63, 48)


class CMD_TLBI_NH_VAA(_TlbiRange):
    VMID = Field(47, 32)


class CMD_TLBI_EL3_ALL(_Cmd):
    pass


class CMD_TLBI_EL3_VA(_TlbiRange):
    pass


class CMD_TLBI_EL2_ALL(_Cmd):
    pass


class CMD_TLBI_EL2_ASID(_Cmd):
    ASID = Field(63, 48)


class CMD_TLBI_EL2_VA(_TlbiRange):
    ASID = Field(63, 48)


class CMD_TLBI_EL2_VAA(_TlbiRange):
    pass


class CMD_TLBI_S12_VMALL(_Cmd):
    VMID = Field(47, 32)


class CMD_TLBI_S2_IPA(_TlbiRangeIpa):
    pass


class CMD_TLBI_NSNH_ALL(_Cmd):
    pass


class CMD_TLBI_S_EL2_ALL(_Cmd):
    pass


class CMD_TLBI_S_EL2_ASID(_Cmd):
    ASID = Field(63, 48)


class CMD_TLBI_S_EL2_VA(_TlbiRange):
    ASID = Field(63, 48)


class CMD_TLBI_S_EL2_VAA(_TlbiRange):
    pass


class CMD_TLBI_S_S12_VMALL(_Cmd):
    VMID = Field(47, 32)


class CMD_TLBI_S_S2_IPA(_TlbiRangeIpa):
    NS = Field(65)  # Addr is a Non-secure IPA of the Secure regime


class CMD_TLBI_SNH_ALL(_Cmd):
    pass


# ---- ATS, PRI, DPT, stall and sync -------------------------------------------------------------


class CMD_ATC_INV(_Cmd):
    GLOBAL = Field(9)
    SSV = Field(11)
    SSID = Field(31, 12)
    SID = Field(63, 32)
    SIZE = Field(69, 64)  # span 4 KB << SIZE; 52 = everything
    ADDR = Field(127, 76, addr_lo=12)


class CMD_PRI_RESP(_Cmd):
    SSV = Field(11)
    SSID = Field(31, 12)
    SID = Field(63, 32)
    PRGINDEX = Field(72, 64)
    RESP = Field(77, 76, PriResp)


class CMD_DPTI_ALL(_Cmd):
    pass


class CMD_DPTI_PA(_Cmd):
    LEAF = Field(64)
    SIZE = Field(75, 72)
    ADDR = Field(119, 76, addr_lo=12)  # PA[55:12]


class CMD_RESUME(_CmdSid):
    AC = Field(12)  # 1 retry, 0 terminate
    AB = Field(13)  # on terminate: 1 abort, 0 RAZ/WI
    STAG = Field(79, 64)


class CMD_STALL_TERM(_CmdSid):
    pass


class CMD_SYNC(_Cmd):
    CS = Field(13, 12, SyncCs)
    MSH = Field(23, 22, Shareability)
    MSIATTR = Field(27, 24)
    MSIDATA = Field(63, 32)
    MSIADDR = Field(119, 66, addr_lo=2)  # PA[55:2]; 0 = no MSI
    MSI_NS = Field(127)  # Realm queues only


COMMAND_LAYOUTS: dict[Opcode, type[Layout]] = {
    Opcode.PREFETCH_CONFIG: CMD_PREFETCH_CONFIG,
    Opcode.PREFETCH_ADDR: CMD_PREFETCH_ADDR,
    Opcode.CFGI_STE: CMD_CFGI_STE,
    Opcode.CFGI_STE_RANGE: CMD_CFGI_STE_RANGE,
    Opcode.CFGI_CD: CMD_CFGI_CD,
    Opcode.CFGI_CD_ALL: CMD_CFGI_CD_ALL,
    Opcode.CFGI_VMS_PIDM: CMD_CFGI_VMS_PIDM,
    Opcode.TLBI_NH_ALL: CMD_TLBI_NH_ALL,
    Opcode.TLBI_NH_ASID: CMD_TLBI_NH_ASID,
    Opcode.TLBI_NH_VA: CMD_TLBI_NH_VA,
    Opcode.TLBI_NH_VAA: CMD_TLBI_NH_VAA,
    Opcode.TLBI_EL3_ALL: CMD_TLBI_EL3_ALL,
    Opcode.TLBI_EL3_VA: CMD_TLBI_EL3_VA,
    Opcode.TLBI_EL2_ALL: CMD_TLBI_EL2_ALL,
    Opcode.TLBI_EL2_ASID: CMD_TLBI_EL2_ASID,
    Opcode.TLBI_EL2_VA: CMD_TLBI_EL2_VA,
    Opcode.TLBI_EL2_VAA: CMD_TLBI_EL2_VAA,
    Opcode.TLBI_S12_VMALL: CMD_TLBI_S12_VMALL,
    Opcode.TLBI_S2_IPA: CMD_TLBI_S2_IPA,
    Opcode.TLBI_NSNH_ALL: CMD_TLBI_NSNH_ALL,
    Opcode.ATC_INV: CMD_ATC_INV,
    Opcode.PRI_RESP: CMD_PRI_RESP,
    Opcode.RESUME: CMD_RESUME,
    Opcode.STALL_TERM: CMD_STALL_TERM,
    Opcode.SYNC: CMD_SYNC,
    Opcode.TLBI_S_EL2_ALL: CMD_TLBI_S_EL2_ALL,
    Opcode.TLBI_S_EL2_ASID: CMD_TLBI_S_EL2_ASID,
    Opcode.TLBI_S_EL2_VA: CMD_TLBI_S_EL2_VA,
    Opcode.TLBI_S_EL2_VAA: CMD_TLBI_S_EL2_VAA,
    Opcode.TLBI_S_S12_VMALL: CMD_TLBI_S_S12_VMALL,
    Opcode.TLBI_S_S2_IPA: CMD_TLBI_S_S2_IPA,
    Opcode.TLBI_SNH_ALL: CMD_TLBI_SNH_ALL,
    Opcode.DPTI_ALL: CMD_DPTI_ALL,
    Opcode.DPTI_PA: CMD_DPTI_PA,
}

_MASK128 = (1 << 128) - 1


def command_opcode(value: int) -> int:
    return value & 0xFF


def command_layout(value: int) -> type[Layout]:
    """The layout that decodes this entry (``CMD_COMMON`` for an unknown opcode)."""
    try:
        return COMMAND_LAYOUTS[Opcode(command_opcode(value))]
    except ValueError:
        return CMD_COMMON


def build_command(opcode: int, **fields: int) -> int:
    """A command with OPCODE filled in; ADDR/MSIADDR are byte addresses (aligned), others raw."""
    layout = COMMAND_LAYOUTS[Opcode(opcode)]
    value = layout.field("OPCODE").insert(opcode)
    for name, field_value in fields.items():
        if name == "OPCODE":
            if int(field_value) != int(opcode):
                raise ValueError(f"OPCODE={field_value:#x} contradicts opcode {opcode:#x}")
            continue
        try:
            f = layout.field(name)
        except KeyError:
            raise ValueError(f"{layout.__name__} has no field {name}") from None
        value = f.set_address(value, field_value) if f.addr_lo is not None else f.set(value, field_value)
    return value


def decode_command(value: int) -> tuple[Opcode | int, dict[str, int]]:
    """``(opcode, fields)`` without OPCODE; an unknown opcode gives the raw int and the common fields."""
    value &= _MASK128
    layout = command_layout(value)
    fields = layout.decode(value)
    del fields["OPCODE"]
    for f in layout.FIELDS:
        if f.addr_lo is not None:
            fields[f.name] = f.get_address(value)
    opcode = command_opcode(value)
    return (Opcode(opcode) if layout is not CMD_COMMON else opcode), fields


def pretty_command(value: int) -> str:
    value &= _MASK128
    layout = command_layout(value)
    if layout is CMD_COMMON:
        return f"CMD_UNKNOWN_{command_opcode(value):#04x}" + layout.pretty(value).removeprefix("CMD_COMMON")
    return layout.pretty(value)


def cfgi_all(ssec: int = 0) -> int:
    """CMD_CFGI_ALL: CMD_CFGI_STE_RANGE with Range = 31 (StreamID ignored)."""
    return build_command(Opcode.CFGI_STE_RANGE, SSEC=ssec, RANGE=31)


def command_words(value: int) -> tuple[int, int]:
    """The two little-endian dwords as the queue holds them."""
    return value & 0xFFFF_FFFF_FFFF_FFFF, (value >> 64) & 0xFFFF_FFFF_FFFF_FFFF


def command_from_words(word0: int, word1: int) -> int:
    return (word0 & 0xFFFF_FFFF_FFFF_FFFF) | (word1 & 0xFFFF_FFFF_FFFF_FFFF) << 64
